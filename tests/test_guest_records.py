"""The host's reading of the guest recorder's stream: lines as guest/vnet-recorder.c
writes them (copied from a Linux 6.1 guest's port), and what an untrusted guest may
send instead."""

from __future__ import annotations

import ipaddress

import pytest

from vnetbackend.guest_records import (
    MAX_LINE,
    RecordFormatError,
    RecordParser,
    parse_record,
)

REAL = (b"h vnet-recorder 1 6.1.0-56-amd64 eth0 208\n"
        b"r 0 0 1 4522c094 1 0800 46 4 17 1041 5678 0a000001 0a000002 0 28\n"
        b"r 1 2 4 640d9d38 0 86dd 56 6 58 0 0 fd000000000000000000000000000001 "
        b"fd000000000000000000000000000002 0 0\n"
        b"r 2 1 2 00000000 0 0806 28 0 0 0 0 - - 0 0\n"
        b"p 3\n")


def test_real_lines_become_records() -> None:
    parser = RecordParser()
    records = parser.feed(REAL)
    assert parser.header == ("6.1.0-56-amd64", "eth0", 208)
    assert [(r.queue, r.hash, r.l4_hash, r.protocol, r.l3_len) for r in records] == [
        (0, 0x4522C094, True, 0x800, 46), (3, 0x640D9D38, False, 0x86DD, 56),
        (1, 0, False, 0x806, 28)]
    first, second, arp = records
    assert (first.src, first.dst, first.src_port, first.dst_port, first.l4_proto,
            first.header_len) == (
        ipaddress.ip_address("10.0.0.1").packed, ipaddress.ip_address("10.0.0.2").packed,
        1041, 5678, 17, 28)
    assert second.src == ipaddress.ip_address("fd00::1").packed
    assert (arp.ip_version, arp.src) == (0, b"")
    assert (parser.passes, parser.last_pass_seq, parser.bad_lines, parser.seq_gaps) == (
        1, 3, 0, 0)


def test_lines_split_anywhere_parse_the_same() -> None:
    whole = RecordParser().feed(REAL)
    parser = RecordParser()
    pieces = [parser.feed(REAL[i:i + 7]) for i in range(0, len(REAL), 7)]
    assert [r for piece in pieces for r in piece] == whole


def test_losses_and_gaps_are_counted() -> None:
    parser = RecordParser()
    parser.feed(b"r 0 0 1 00000001 0 0800 20 4 1 0 0 01020304 05060708 0 0\n"
                b"l 1 17\nl 0 -1\n"
                b"r 5 0 1 00000001 0 0800 20 4 1 0 0 01020304 05060708 0 0\n")
    assert (parser.records, parser.lost, parser.lost_unknown, parser.seq_gaps) == (2, 17, 1, 4)


@pytest.mark.parametrize("line", [
    b"r 0 0 1 0000001 0 0800 20 4 1 0 0 01020304 05060708 0 0",       # short hash
    b"r 0 0 1 00000001 0 0800 20 4 1 0 0 0102030405 05060708 0 0",   # odd address
    b"r 0 0 1 00000001 0 0800 20 6 1 0 0 01020304 05060708 0 0",     # v6 with v4 addresses
    b"r 0 0 1 00000001 0 0800 20 4 1 70000 0 01020304 05060708 0 0",  # port out of range
    b"r 0 0 1 00000001 0 0800 20 4 1 0 0 01020304 05060708 f0 0",    # unknown flags
    b"r 0 0 1 00000001 2 0800 20 4 1 0 0 01020304 05060708 0 0",     # l4 flag not 0/1
    b"x hello", b"h vnet-recorder 2 6.1 eth0 208", b"\xff\xfe",
])
def test_malformed_lines_are_counted_with_the_reason(line: bytes) -> None:
    with pytest.raises(RecordFormatError):
        parse_record(line)
    parser = RecordParser()
    assert parser.feed(line + b"\n" + REAL) != []
    assert parser.bad_lines == 1
    assert repr(line[:20])[2:-1] in parser.bad_examples[0]


def test_an_endless_line_is_bounded_and_the_stream_recovers() -> None:
    parser = RecordParser()
    for _ in range(100):
        assert parser.feed(b"A" * 1000) == []
    assert parser.bad_lines == 1
    assert len(parser._partial) <= MAX_LINE
    assert len(parser.feed(b"\n" + REAL)) == 3
    assert parser.bad_lines == 1
