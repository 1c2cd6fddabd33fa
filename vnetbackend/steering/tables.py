"""The steering program's Toeplitz tables, in the order its map holds them.

The program hashes an input as the XOR of ``toeplitz[i][d[i]]``, the hash of byte value
``d[i]`` at input position i (`vnetbackend.rss.toeplitz` defines the tables). A new key is
on the mirror's path, where the daemon runs cold and each numpy call costs ~15 us, so
the tables are built with a dozen calls into one array, copied into the map value as it
is (~0.19 ms cold, ~0.04 ms warm). A guest mostly changes its table and keeps its key, so
the tables of the last few keys are kept (`cached_rows`).
"""

from __future__ import annotations

import functools

import numpy as np

from vnetbackend.rss.types import MAX_HASH_INPUT, MAX_KEY_SIZE

_BYTE_BITS = 8
#: Shifting the 64 bits from byte i right by these leaves the window of bit i*8 + b.
_WINDOW_SHIFTS = np.uint64(32) - np.arange(_BYTE_BITS, dtype=np.uint64)


def toeplitz_rows(key: bytes, width: int = MAX_HASH_INPUT) -> np.ndarray:
    """``rows[i][v]``: the Toeplitz hash under *key* of byte value v at input position i,
    for positions below *width*; C-ordered uint32 of shape (width, 256).

    Bit b (0 the most significant) of the byte at position i selects the key's 32-bit
    window starting at key bit 8i + b, key bits past its end being zero; a value's hash is
    the XOR of the windows its set bits select, so the 256 values are built by doubling
    from the 8 single bits.
    """
    if not 1 <= len(key) <= MAX_KEY_SIZE:
        raise ValueError(f"key of {len(key)} bytes, not 1..{MAX_KEY_SIZE}")
    padded = bytes(key).ljust(width + _BYTE_BITS, b"\0")
    # The 64 key bits from byte i on, for every position i, big-endian.
    words = np.frombuffer(b"".join(padded[i: i + _BYTE_BITS] for i in range(width)),
                          dtype=">u8")
    windows = ((words[:, None] >> _WINDOW_SHIFTS) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    rows = np.zeros((width, 256), dtype=np.uint32)
    for bit in range(_BYTE_BITS):  # the value's least significant bit first
        span = 1 << bit
        np.bitwise_xor(rows[:, :span], windows[:, _BYTE_BITS - 1 - bit, None],
                       out=rows[:, span: 2 * span])
    return rows


@functools.lru_cache(maxsize=8)
def cached_rows(key: bytes) -> np.ndarray:
    """`toeplitz_rows` of *key*, kept for the last few keys (read-only)."""
    rows = toeplitz_rows(key)
    rows.flags.writeable = False
    return rows
