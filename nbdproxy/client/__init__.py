"""Client side of nbdproxy: HTTP connections over unix sockets, the control client, transfers."""
