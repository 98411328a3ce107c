"""Backends: where image bytes live. Only NBD for now."""
