"""The Toeplitz hash used by RSS, table-driven.

For a key K and input bytes d[0..n), bit j of the input (most significant bit of d[0]
first) selects the 32-bit window of K that starts at bit j; the hash is the XOR of the
selected windows. Key bits past the key's end count as zero. Because the hash is linear
in the input, it splits per byte: ``hash = XOR_i table[i][d[i]]`` where ``table[i][v]`` is
the hash of byte value v at position i. The tables depend only on the key.
"""

from __future__ import annotations

import functools
import operator
import sys
from collections.abc import Sequence

from vnetbackend.rss.types import MAX_HASH_INPUT

ByteTables = tuple[tuple[int, ...], ...]


def _window(key_int: int, key_bits: int, pos: int) -> int:
    return (key_int >> (key_bits - 32 - pos)) & 0xFFFFFFFF


def build_tables(key: bytes, width: int = MAX_HASH_INPUT) -> ByteTables:
    """Per-position byte tables for *key*, covering inputs up to *width* bytes.

    Built for all positions at once, since a new key is on the mirror's path: each
    byte value v gets one integer holding its hash at every position, 32 bits a
    position. That integer is linear in v, so the 256 of them are XORs of the 8
    integers of the single bits (each doubling of the list XORs one bit's integer into
    the values so far). Their bytes, read as 32-bit words, are the tables in
    value-major order.
    """
    key_bits = max(len(key), width + 4) * 8
    key_int = int.from_bytes(key.ljust(key_bits // 8, b"\0"), "big")
    by_value = [0]
    for bit in range(7, -1, -1):  # the value's least significant bit first
        shift = key_bits - 32 - bit  # of the window at position 0 (see `_window`)
        bit_at_positions = 0
        for position in range(width):
            window = (key_int >> (shift - 8 * position)) & 0xFFFFFFFF
            bit_at_positions |= window << (32 * position)
        by_value += [v ^ bit_at_positions for v in by_value]
    words = memoryview(b"".join([v.to_bytes(4 * width, sys.byteorder) for v in by_value]))
    words = words.cast("I")
    return tuple(tuple(words[position::width]) for position in range(width))


@functools.lru_cache(maxsize=64)
def tables_for(key: bytes) -> ByteTables:
    """Cached `build_tables` for inputs up to the longest RSS hash input."""
    return build_tables(key)


def hash_with_tables(tables: Sequence[Sequence[int]], data: bytes) -> int:
    """Toeplitz hash of *data* using tables from `build_tables`: the XOR of
    ``tables[i][data[i]]`` over the input bytes."""
    return functools.reduce(operator.xor, map(operator.getitem, tables, data), 0)


def toeplitz(key: bytes, data: bytes) -> int:
    """Toeplitz hash of *data* under *key* (any lengths; inputs past 36 bytes are slower)."""
    if len(data) <= MAX_HASH_INPUT:
        return hash_with_tables(tables_for(bytes(key)), data)
    return hash_with_tables(build_tables(bytes(key), len(data)), data)


def toeplitz_bitwise(key: bytes, data: bytes) -> int:
    """The textbook bit-by-bit definition; slow, kept as the oracle for the tables."""
    key_bits = max(len(key), len(data) + 4) * 8
    key_int = int.from_bytes(bytes(key).ljust(key_bits // 8, b"\0"), "big")
    result = 0
    for pos in range(len(data) * 8):
        if data[pos // 8] & (0x80 >> (pos % 8)):
            result ^= _window(key_int, key_bits, pos)
    return result
