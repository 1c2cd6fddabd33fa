"""The guest's records of what its driver received, as its recorder streams them.

The recorder (``guest/vnet-recorder.c``, run in the guest) writes one text line per
received frame on the virtio-serial port ``org.vnetbackend.records.0``::

    h vnet-recorder 1 <kernel release> <interface> <skb data offset>
    r <seq> <cpu> <queue_mapping> <hash> <l4> <ethertype> <l3 len> <ip version>
      <l4 proto> <src port> <dst port> <src> <dst> <flags> <headers>
    l <cpu> <count>        the guest kernel's trace buffer dropped <count> frames (-1: unknown)
    p <seq>                the recorder finished a pass over every CPU's buffer

The guest is untrusted: `RecordParser` takes bytes as they come, accepts only lines of
exactly this shape within `MAX_LINE` bytes, and counts everything else (``bad_lines``,
with the latest few kept in ``bad_examples``) instead of dropping it unseen. Gaps in
the record sequence numbers and the recorder's own loss lines are counted too, so a
consumer can tell a frame the guest never received from a record that was lost.
"""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from vnetbackend.errors import VnetError

#: The virtio-serial port's name (QEMU ``virtserialport,name=...``).
PORT_NAME = "org.vnetbackend.records.0"
#: Longest line accepted (a record with two IPv6 addresses is about 130 bytes).
MAX_LINE = 256
#: How many malformed lines are kept, as examples, for the error report.
KEPT_BAD_LINES = 8
FORMAT_VERSION = 1

FLAG_FRAGMENT = 1
FLAG_EXT_HEADERS = 2
FLAG_SHORT = 4
FLAG_LATER_FRAGMENT = 8
_KNOWN_FLAGS = FLAG_FRAGMENT | FLAG_EXT_HEADERS | FLAG_SHORT | FLAG_LATER_FRAGMENT

_RECORD = re.compile(
    rb"r (\d{1,20}) (\d{1,4}) (\d{1,5}) ([0-9a-f]{8}) ([01]) ([0-9a-f]{4}) (\d{1,10}) "
    rb"([046]) (\d{1,3}) (\d{1,5}) (\d{1,5}) (-|[0-9a-f]{8}|[0-9a-f]{32}) "
    rb"(-|[0-9a-f]{8}|[0-9a-f]{32}) ([0-9a-f]{1,2}) (\d{1,3})")
_HEADER = re.compile(rb"h vnet-recorder (\d+) (\S{1,64}) (\S{1,16}) (\d{1,6})")
_LOSS = re.compile(rb"l (\d{1,4}) (-1|\d{1,20})")
_PASS = re.compile(rb"p (\d{1,20})")
_ADDRESS_WIDTH = {0: 0, 4: 4, 6: 16}


class RecordFormatError(VnetError, ValueError):
    """A line from the guest's recorder that is not a record, header, loss or pass line."""

    def __init__(self, line: bytes, reason: str) -> None:
        super().__init__(f"guest record line {line[:MAX_LINE]!r}: {reason}")
        self.line = line
        self.reason = reason


@dataclass(frozen=True, slots=True)
class GuestRecord:
    """One frame as the guest's driver received it, and its identity from its headers.

    ``queue`` is the receive queue (the skb's queue_mapping - 1), None if the driver
    recorded none. ``src``/``dst`` are the IP header's addresses (empty if not IP);
    ``l4_proto`` is the IP protocol (or the last IPv6 next header), ports are 0 unless the
    transport header was read. ``protocol`` is the ethertype after any VLAN tags' outer
    one as the driver set ``skb->protocol``. ``header_len`` is the bytes of IP and TCP/UDP
    headers (0 where the transport header was not read): the payload is the rest.
    """

    seq: int
    cpu: int
    queue: int | None
    hash: int
    l4_hash: bool
    protocol: int
    l3_len: int
    ip_version: int
    l4_proto: int
    src_port: int
    dst_port: int
    src: bytes
    dst: bytes
    flags: int
    header_len: int = 0

    @property
    def fragment(self) -> bool:
        return bool(self.flags & FLAG_FRAGMENT)

    @property
    def short(self) -> bool:
        """Its headers were not all within the bytes the recorder read."""
        return bool(self.flags & FLAG_SHORT)


def parse_record(line: bytes) -> GuestRecord:
    """One ``r`` line (without its newline); `RecordFormatError` if it is not one."""
    match = _RECORD.fullmatch(line)
    if match is None:
        raise RecordFormatError(line, "not a record line")
    (seq, cpu, mapping, value, l4, ethertype, l3_len, version, proto, sport, dport,
     src, dst, flags, headers) = match.groups()
    ip_version = int(version)
    width = _ADDRESS_WIDTH[ip_version]
    addresses = [b"" if a == b"-" else bytes.fromhex(a.decode()) for a in (src, dst)]
    if any(len(a) != width for a in addresses):
        raise RecordFormatError(line, f"addresses do not fit IP version {ip_version}")
    numbers = {"src port": int(sport), "dst port": int(dport), "l4 proto": int(proto),
               "queue_mapping": int(mapping), "flags": int(flags, 16)}
    for name, number, limit in (("src port", numbers["src port"], 0xFFFF),
                                ("dst port", numbers["dst port"], 0xFFFF),
                                ("l4 proto", numbers["l4 proto"], 0xFF),
                                ("queue_mapping", numbers["queue_mapping"], 0xFFFF),
                                ("flags", numbers["flags"], _KNOWN_FLAGS)):
        if number > limit or (name == "flags" and number & ~_KNOWN_FLAGS):
            raise RecordFormatError(line, f"{name} {number} out of range")
    return GuestRecord(
        seq=int(seq), cpu=int(cpu),
        queue=numbers["queue_mapping"] - 1 if numbers["queue_mapping"] else None,
        hash=int(value, 16), l4_hash=l4 == b"1", protocol=int(ethertype, 16),
        l3_len=int(l3_len), ip_version=ip_version, l4_proto=numbers["l4 proto"],
        src_port=numbers["src port"], dst_port=numbers["dst port"],
        src=addresses[0], dst=addresses[1], flags=numbers["flags"],
        header_len=int(headers))


@dataclass
class RecordParser:
    """Turns the port's bytes into `GuestRecord`s; counts what it cannot use.

    ``lost`` counts frames the guest kernel's buffer dropped (its loss lines),
    ``lost_unknown`` loss lines without a count, ``seq_gaps`` records missing from the
    sequence (lines lost or garbled on the way), ``passes``/``last_pass_seq`` the
    recorder's pass lines, ``passes_since_record`` those since the latest record (two
    mean the recorder found every CPU's buffer empty after reading it).
    """

    records: int = 0
    bad_lines: int = 0
    bad_examples: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=KEPT_BAD_LINES))
    lost: int = 0
    lost_unknown: int = 0
    seq_gaps: int = 0
    passes: int = 0
    last_pass_seq: int = -1
    passes_since_record: int = 0
    header: tuple[str, str, int] | None = None
    _next_seq: int | None = None
    _partial: bytes = b""
    _overlong: bool = False

    def feed(self, data: bytes) -> list[GuestRecord]:
        """The records completed by *data* (lines may span calls)."""
        if self._overlong:  # skip the rest of a line already counted as bad
            end = data.find(b"\n")
            if end < 0:
                return []
            data, self._overlong = data[end + 1:], False
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        found = []
        if len(self._partial) > MAX_LINE:
            self._bad(self._partial[:MAX_LINE], f"line longer than {MAX_LINE} bytes")
            self._partial, self._overlong = b"", True
        for line in lines:
            record = self._line(line)
            if record is not None:
                found.append(record)
        return found

    def _bad(self, line: bytes, reason: str) -> None:
        self.bad_lines += 1
        self.bad_examples.append(str(RecordFormatError(line, reason)))

    def _line(self, line: bytes) -> GuestRecord | None:
        if len(line) > MAX_LINE:
            self._bad(line, f"line longer than {MAX_LINE} bytes")
            return None
        kind = line[:1]
        try:
            if kind == b"r":
                return self._record(parse_record(line))
            if kind == b"p" and (match := _PASS.fullmatch(line)):
                self.passes += 1
                self.passes_since_record += 1
                self.last_pass_seq = int(match[1])
                return None
            if kind == b"l" and (match := _LOSS.fullmatch(line)):
                count = int(match[2])
                if count < 0:
                    self.lost_unknown += 1
                else:
                    self.lost += count
                return None
            if kind == b"h" and (match := _HEADER.fullmatch(line)):
                if int(match[1]) != FORMAT_VERSION:
                    raise RecordFormatError(line, f"format version {int(match[1])}, "
                                                  f"expected {FORMAT_VERSION}")
                self.header = (match[2].decode(), match[3].decode(), int(match[4]))
                self._next_seq = None  # a new recorder counts from 0
                return None
            raise RecordFormatError(line, "unknown line")
        except RecordFormatError as err:
            self._bad(line, err.reason)
            return None

    def _record(self, record: GuestRecord) -> GuestRecord:
        if self._next_seq is not None and record.seq != self._next_seq:
            self.seq_gaps += abs(record.seq - self._next_seq)
        self._next_seq = record.seq + 1
        self.records += 1
        self.passes_since_record = 0
        return record

    def summary(self) -> dict[str, object]:
        return {"records": self.records, "bad-lines": self.bad_lines,
                "bad-examples": list(self.bad_examples), "lost": self.lost,
                "lost-unknown": self.lost_unknown, "seq-gaps": self.seq_gaps}


async def stream_records(reader: asyncio.StreamReader, parser: RecordParser,
                         deliver: Callable[[list[GuestRecord]], None],
                         chunk: int = 1 << 16) -> None:
    """Feed *reader*'s bytes to *parser* until end of stream; hand each batch of records
    to *deliver* (with an empty list after pass lines, so a waiter can look again)."""
    while data := await reader.read(chunk):
        deliver(parser.feed(data))
