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
from collections.abc import Sequence

from vnetbackend.rss.types import MAX_HASH_INPUT

ByteTables = tuple[tuple[int, ...], ...]


def _window(key_int: int, key_bits: int, pos: int) -> int:
    return (key_int >> (key_bits - 32 - pos)) & 0xFFFFFFFF


def build_tables(key: bytes, width: int = MAX_HASH_INPUT) -> ByteTables:
    """Per-position byte tables for *key*, covering inputs up to *width* bytes."""
    key_bits = max(len(key), width + 4) * 8
    key_int = int.from_bytes(key.ljust(key_bits // 8, b"\0"), "big")
    tables = []
    for position in range(width):
        bit_windows = [_window(key_int, key_bits, position * 8 + bit) for bit in range(8)]
        table = [0] * 256
        for value in range(1, 256):
            low = value & -value
            bit = 7 - (low.bit_length() - 1)
            table[value] = table[value ^ low] ^ bit_windows[bit]
        tables.append(tuple(table))
    return tuple(tables)


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
