"""The steering program's Toeplitz tables, in the order its map holds them.

The program hashes an input as the XOR of ``toeplitz[i][d[i]]``, the hash of byte value
``d[i]`` at input position i (`vnetbackend.rss.toeplitz` defines the tables). A new key is
on the mirror's path, so the tables are built here in one go as one array, position by
position, that is copied into the map value as it is: ~0.06 ms, where filling the value
from the model's tables one number at a time took ~0.2 ms.
"""

from __future__ import annotations

import numpy as np

from vnetbackend.rss.types import MAX_HASH_INPUT, MAX_KEY_SIZE

_BYTE_BITS = 8


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
    padded = np.zeros(max(len(key), width + _BYTE_BITS), dtype=np.uint64)
    padded[: len(key)] = np.frombuffer(bytes(key), dtype=np.uint8)
    # The 64 key bits from byte i on, for every position i.
    words = np.zeros(width, dtype=np.uint64)
    for offset in range(_BYTE_BITS):
        words = (words << np.uint64(8)) | padded[offset: offset + width]
    shifts = np.uint64(32) - np.arange(_BYTE_BITS, dtype=np.uint64)
    windows = ((words[:, None] >> shifts[None, :]) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    rows = np.zeros((width, 1), dtype=np.uint32)
    for bit in range(_BYTE_BITS - 1, -1, -1):  # the value's least significant bit first
        rows = np.concatenate([rows, rows ^ windows[:, bit: bit + 1]], axis=1)
    return np.ascontiguousarray(rows)
