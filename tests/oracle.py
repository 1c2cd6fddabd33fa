"""An oracle for the Toeplitz hash that shares nothing with `vnetbackend.rss.toeplitz`.

It follows the usual description of the algorithm (Microsoft's RSS documentation): a
32-bit register starts as the key's first 32 bits; for each input bit, most significant
first, the register is XORed into the result when the bit is set, and the register then
shifts left by one, taking in the key's next bit (zero past the key's end). The model
instead splits the hash into per-byte tables built from 32-bit windows of the key.
"""

from __future__ import annotations


def key_bit(key: bytes, index: int) -> int:
    """Bit *index* of *key*, most significant bit of the first byte first; 0 past it."""
    if index >= 8 * len(key):
        return 0
    return (key[index // 8] >> (7 - index % 8)) & 1


def toeplitz_oracle(key: bytes, data: bytes) -> int:
    register = 0
    for index in range(32):
        register = (register << 1) | key_bit(key, index)
    result = 0
    incoming = 32
    for byte in data:
        for shift in range(7, -1, -1):
            if (byte >> shift) & 1:
                result ^= register
            register = ((register << 1) & 0xFFFFFFFF) | key_bit(key, incoming)
            incoming += 1
    return result
