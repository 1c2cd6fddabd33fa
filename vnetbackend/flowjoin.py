"""Joining the guest's records with the kernel's reports by flow, and judging each frame.

Crafted frames can be told apart by their length; ordinary traffic cannot (a TCP bulk
flow sends thousands of frames of one length, retransmissions repeat a frame). Here a
frame is found by its identity as both sides read it from its headers: IP version,
addresses, and for TCP/UDP the protocol and ports (the steering program's report
counts them only then); other IP frames also by L3 length, non-IP frames by length
alone. Within one identity the guest's records (in the recorder's order) and the
reports (in the ring's order) are walked together: a report pairs with a record of its
length, or, when the host sent a GSO packet (the tap runs the steering program once,
then segments), with the run of records whose payloads add up to its payload. Frames
of one identity are interchangeable for the check, since the hash and queue depend on
nothing else, except for the configuration in force, which the caller gives per report (`judge`).

Whatever is left over is unmatched with a reason (`Reason`): a guest record with no
report (the frame did not pass the steering program while it reported: reports off, the
program detached for an RSS change, or a frame the guest made up), a report with no
guest record (the guest did not receive it, or its recorder lost the record), a guest
record whose headers the guest could not read.

No I/O here: the inputs are `vnetbackend.guest_records.GuestRecord` and
`vnetbackend.steering.reports.Report` lists.
"""

from __future__ import annotations

import enum
import struct
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from vnetbackend.checker import Outcome, expectation
from vnetbackend.errors import VnetError
from vnetbackend.guest_records import GuestRecord
from vnetbackend.qemu.departures import Kind
from vnetbackend.rss import RssConfig
from vnetbackend.steering.reports import Report

ETH_HEADER_LEN = 14
_PORTED = (6, 17)

#: (ip version, src, dst, l4 proto, src port, dst port, length); length is 0 for TCP and
#: UDP (found by order and payload, see `join`), else the L3 length for IP frames and
#: the frame length for the rest.
FlowKey = tuple[int, bytes, bytes, int, int, int, int]


class FlowJoinError(VnetError, ValueError):
    """The inputs of a check do not fit together (field and value in the message)."""


class Reason(enum.Enum):
    """Why a frame ended unmatched."""

    NO_REPORT = "guest record with no report of its flow and length"
    NOT_IP_NO_REPORT = "not IP (no flow identity) and no report of its length"
    SHORT_HEADERS = "the guest could not read the frame's headers"
    NO_GUEST_RECORD = "report with no guest record (not received, or the record was lost)"
    EXT_HEADERS = "IPv6 extension headers: the identity does not carry what the hash needs"


def report_key(report: Report) -> FlowKey:
    if report.ip_version == 0:
        return (0, b"", b"", 0, 0, 0, report.frame_len)
    if report.l4_proto in _PORTED:
        return (report.ip_version, report.src, report.dst, report.l4_proto,
                report.src_port, report.dst_port, 0)
    return (report.ip_version, report.src, report.dst, 0, 0, 0, report.l3_len)


def record_key(record: GuestRecord) -> FlowKey:
    """The key of *record* as the steering program would report its frame: ports only
    for TCP and UDP outside fragments (the program's reading), non-IP by frame length."""
    if record.ip_version == 0:
        return (0, b"", b"", 0, 0, 0, record.l3_len + ETH_HEADER_LEN)
    if record.l4_proto in _PORTED and not record.fragment:
        return (record.ip_version, record.src, record.dst, record.l4_proto,
                record.src_port, record.dst_port, 0)
    return (record.ip_version, record.src, record.dst, 0, 0, 0, record.l3_len)


@dataclass(frozen=True, slots=True)
class Unmatched:
    """A guest record or a report (by its index) that found no partner, and why."""

    reason: Reason
    record: GuestRecord | None = None
    report_index: int | None = None


@dataclass
class Join:
    """Pairs of (guest record, index of its report) and what stayed unmatched. One
    report may have several records: the segments of a GSO packet."""

    pairs: list[tuple[GuestRecord, int]] = field(default_factory=list)
    unmatched: list[Unmatched] = field(default_factory=list)

    def unmatched_by_reason(self) -> Counter[str]:
        return Counter(u.reason.name for u in self.unmatched)


def _segments(records: Sequence[GuestRecord], first: int, report: Report) -> int:
    """How many records from *first* on are the segments of *report*'s packet: 1 if the
    lengths are equal; for a longer (GSO) report, the run of records whose payloads add
    up to the report's payload exactly (the headers, ``header_len``, repeat in every
    segment); 0 if none fits."""
    head = records[first]
    if head.l3_len == report.l3_len:
        return 1
    if not head.header_len or head.l3_len > report.l3_len:
        return 0
    wanted = report.l3_len - head.header_len
    total = 0
    for count, record in enumerate(records[first:], start=1):
        if record.header_len != head.header_len or record.l3_len > report.l3_len:
            return 0
        total += record.l3_len - record.header_len
        if total >= wanted:
            return count if total == wanted else 0
    return 0


#: How far the walk looks ahead for the next fit when a record and a report do not fit.
LOOKAHEAD = 64


def _first_fit(records: Sequence[GuestRecord], reports: Sequence[tuple[int, Report]],
               i: int, j: int, step_records: bool) -> int:
    """How many records (or reports) to pass over before the next fit; LOOKAHEAD + 1 if
    none within LOOKAHEAD."""
    for k in range(1, LOOKAHEAD + 1):
        ri, rj = (i + k, j) if step_records else (i, j + k)
        if ri >= len(records) or rj >= len(reports):
            break
        if _segments(records, ri, reports[rj][1]):
            return k
    return LOOKAHEAD + 1


def _join_flow(records: Sequence[GuestRecord], reports: Sequence[tuple[int, Report]],
               result: Join) -> None:
    """Walk one flow's records and reports in order. Where the head record and report
    do not fit, whichever of them stands before the nearer next fit is left unmatched (a
    record without report: the program was detached for an RSS change, or reports were
    off; a report without record: the guest did not get the frame, or its record was
    lost); what is left at the end is unmatched too."""
    i = j = 0
    while i < len(records) and j < len(reports):
        index, report = reports[j]
        count = _segments(records, i, report)
        if count == 0:
            if (_first_fit(records, reports, i, j, step_records=False)
                    < _first_fit(records, reports, i, j, step_records=True)):
                result.unmatched.append(Unmatched(Reason.NO_GUEST_RECORD, report_index=index))
                j += 1
            else:
                result.unmatched.append(Unmatched(Reason.NO_REPORT, record=records[i]))
                i += 1
            continue
        result.pairs.extend((record, index) for record in records[i:i + count])
        i, j = i + count, j + 1
    reason = Reason.NO_REPORT if records and records[0].ip_version else Reason.NOT_IP_NO_REPORT
    result.unmatched.extend(Unmatched(reason, record=r) for r in records[i:])
    result.unmatched.extend(Unmatched(Reason.NO_GUEST_RECORD, report_index=index)
                            for index, _ in reports[j:])


def join(records: Sequence[GuestRecord], reports: Sequence[Report]) -> Join:
    """Pair *records* with *reports* by identity, in order within each identity."""
    report_flows: dict[FlowKey, list[tuple[int, Report]]] = defaultdict(list)
    for index, report in enumerate(reports):
        report_flows[report_key(report)].append((index, report))
    record_flows: dict[FlowKey, list[GuestRecord]] = defaultdict(list)
    result = Join()
    for record in sorted(records, key=lambda r: r.seq):
        if record.short:
            result.unmatched.append(Unmatched(Reason.SHORT_HEADERS, record=record))
        else:
            record_flows[record_key(record)].append(record)
    for key in record_flows.keys() | report_flows.keys():
        _join_flow(record_flows.get(key, []), report_flows.get(key, []), result)
    return result


def identity_frame(report: Report, ethertype: int) -> bytes:
    """A frame with *report*'s identity (addresses, protocol, ports, L3 length) and
    nothing else: what the reference model needs to steer it. *ethertype* is used for
    non-IP frames, which the model steers alike whatever it is."""
    eth = bytes(12)
    proto = report.l4_proto
    if proto == 6:
        l4 = struct.pack("!HH", report.src_port, report.dst_port) + bytes(16)
    elif proto == 17:
        l4 = struct.pack("!HH", report.src_port, report.dst_port) + bytes(4)
    else:
        l4 = b""
    if report.ip_version == 4:
        flags = 0x2000 if report.fragment else 0  # more fragments: a first fragment
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, min(report.l3_len, 0xFFFF), 0, flags, 64,
                         proto if l4 else 0xFD, 0, report.src, report.dst)
        return eth + b"\x08\x00" + ip + l4
    if report.ip_version == 6:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto if l4 else 59, 64,
                         report.src, report.dst)
        return eth + b"\x86\xdd" + ip + l4
    return eth + struct.pack("!H", ethertype) + bytes(28)


class ConfigTimeline:
    """Which configurations may have been in force at each position of a stream (report
    index, or guest record sequence number).

    Starts with one configuration; each `change` names the span ``[start, end)`` in which
    the old one or the new one may have applied (frames in flight while the change went
    through) and after which the new one alone did.
    """

    def __init__(self, initial: RssConfig) -> None:
        self._changes: list[tuple[int, int, RssConfig]] = []
        self._initial = initial

    def change(self, start: int, end: int, config: RssConfig) -> None:
        if end < start or (self._changes and start < self._changes[-1][1]):
            raise FlowJoinError(f"change span [{start}, {end}) overlaps or runs backwards")
        self._changes.append((start, end, config))

    @property
    def changes(self) -> int:
        return len(self._changes)

    def at(self, position: int) -> tuple[RssConfig, ...]:
        current = self._initial
        for start, end, config in self._changes:
            if position < start:
                break
            if position < end:
                return (current, config)
            current = config
        return (current,)


@dataclass(frozen=True, slots=True)
class FlowVerdict:
    """One joined frame's outcome; ``configs`` is how many configurations could have
    been in force for either side (more than one only for frames in flight across an RSS
    change)."""

    record: GuestRecord
    report: Report
    outcome: Outcome
    reason: str
    configs: int


def judge(record: GuestRecord, report: Report, kernel_configs: Sequence[RssConfig],
          guest_configs: Sequence[RssConfig]) -> FlowVerdict:
    """The kernel's report against the model under any of *kernel_configs*, and the
    guest's record against what the guest should see
    (`vnetbackend.checker.expectation`, departures included) under any of
    *guest_configs*: one configuration each, or the old and the new across a change."""
    if not kernel_configs or not guest_configs:
        raise FlowJoinError("configs: empty (judge needs at least one configuration)")
    spread = max(len(kernel_configs), len(guest_configs))
    if report.has_ext_headers:
        return FlowVerdict(record, report, Outcome.UNMATCHED, Reason.EXT_HEADERS.value, spread)
    frame = identity_frame(report, record.protocol)
    kernel_ok = any((report.hash, report.report, report.queue) == config.steer(frame)[:3]
                    for config in kernel_configs)
    guest_ok = False
    departure_kind: Kind | None = None
    for config in guest_configs:
        expected = expectation(config, frame)
        if (record.queue, record.hash, record.l4_hash) == (
                expected.queue, expected.hash, expected.l4_hash):
            guest_ok = True
            model = config.steer(frame)
            if expected.departure is not None and (
                    expected.queue, expected.hash, expected.l4_hash) != (
                    model.queue, model.hash, model.report.is_l4):
                departure_kind = expected.departure.kind
    reasons = []
    if not kernel_ok:
        reasons.append("kernel differs from the specification")
    if not guest_ok:
        reasons.append("guest differs from the specification")
    if reasons:
        return FlowVerdict(record, report, Outcome.DISAGREED, "; ".join(reasons), spread)
    outcome = Outcome.AGREED
    if departure_kind is not None:
        outcome = Outcome.DEPARTURE if departure_kind is Kind.DEPARTS else Outcome.SPEC_OPEN
    return FlowVerdict(record, report, outcome, "", spread)


@dataclass
class FlowCheck:
    """Every frame of a run: joined and judged, or unmatched with its reason."""

    verdicts: list[FlowVerdict]
    unmatched: list[Unmatched]

    def tally(self) -> dict[str, object]:
        outcomes = Counter(v.outcome.value for v in self.verdicts)
        outcomes[Outcome.UNMATCHED.value] += len(self.unmatched)
        return {"frames": len(self.verdicts) + len(self.unmatched),
                **{o.value: outcomes[o.value] for o in Outcome},
                "across-changes": sum(v.configs > 1 for v in self.verdicts),
                "unmatched-reasons": dict(Counter(
                    [u.reason.name for u in self.unmatched]
                    + [Reason.EXT_HEADERS.name for v in self.verdicts
                       if v.outcome is Outcome.UNMATCHED]))}


def check_flows(records: Sequence[GuestRecord], reports: Sequence[Report],
                kernel: ConfigTimeline, guest: ConfigTimeline) -> FlowCheck:
    """Join *records* with *reports* and judge each pair: the report by *kernel* at its
    index in *reports*, the record by *guest* at its sequence number."""
    joined = join(records, reports)
    verdicts = [judge(record, reports[index], kernel.at(index), guest.at(record.seq))
                for record, index in joined.pairs]
    return FlowCheck(verdicts, joined.unmatched)
