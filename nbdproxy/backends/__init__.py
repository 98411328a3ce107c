"""Backends: where image bytes live (NBD exports, files). Extent and Caps are their common types."""

from dataclasses import dataclass
from typing import NamedTuple


class Extent(NamedTuple):
    start: int
    length: int
    zero: bool          # reads as zeros
    hole: bool          # unallocated in this layer (False when unknown)
    dirty: bool         # only meaningful for context "dirty"


@dataclass(frozen=True)
class Caps:
    zero: bool          # can write zeroes efficiently (else the backend writes zero buffers itself)
    flush: bool
    extents: frozenset  # contexts it can answer: {"zero"} or {"zero", "dirty"}
    multi_conn: bool    # a flush on one channel covers all
    max_connections: int   # OPTIONS max_readers/max_writers
    zero_copy: bool     # channel has send_to/recv_from
