"""The program's Toeplitz tables (`vnetbackend.steering.tables`) against the bit-by-bit
definition of the hash, which builds nothing in common with them."""

import random

import pytest

from vnetbackend.rss.toeplitz import toeplitz_bitwise
from vnetbackend.rss.types import MAX_HASH_INPUT, MAX_KEY_SIZE
from vnetbackend.steering.tables import cached_rows, toeplitz_rows


@pytest.mark.parametrize("key_length", [1, 4, 16, 39, MAX_KEY_SIZE])
def test_each_entry_is_the_hash_of_one_byte_at_its_position(key_length: int) -> None:
    rng = random.Random(key_length)
    key = bytes(rng.randrange(256) for _ in range(key_length))
    rows = toeplitz_rows(key)
    assert rows.shape == (MAX_HASH_INPUT, 256) and rows.flags.c_contiguous
    for position in range(MAX_HASH_INPUT):
        for value in [0, 1, 0x80, 0xFF, *(rng.randrange(256) for _ in range(4))]:
            data = bytes(position) + bytes([value])
            assert int(rows[position][value]) == toeplitz_bitwise(key, data), (position, value)


def test_a_key_of_no_bytes_or_too_many_is_refused() -> None:
    for key in (b"", bytes(MAX_KEY_SIZE + 1)):
        with pytest.raises(ValueError, match="key of"):
            toeplitz_rows(key)


def test_kept_tables_are_those_of_their_key_and_cannot_be_changed() -> None:
    keys = [bytes([seed]) * MAX_KEY_SIZE for seed in range(1, 12)]  # more than are kept
    for key in keys + keys[::-1]:
        rows = cached_rows(key)
        assert int(rows[3][0x41]) == toeplitz_bitwise(key, bytes(3) + b"\x41")
        with pytest.raises(ValueError, match="read-only"):
            rows[0][0] = 0
