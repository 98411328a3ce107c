"""nbdproxy: move virtual-disk images over HTTP to and from NBD exports."""

__version__ = "0.1.0"
