"""Joining the guest's records with the kernel's reports by flow, as both stream in.

Crafted frames can be told apart by their length; ordinary traffic cannot (a TCP bulk
flow sends thousands of frames of one length, retransmissions repeat a frame). Here a
frame is found by its identity as both sides read it from its headers: IP version,
addresses, and for TCP/UDP the protocol and ports (the steering program's report
counts them only then); other IP frames also by L3 length, non-IP frames by length
alone. Frames of one identity are interchangeable for the check: their hash and queue
depend on nothing else but the configuration in force.

The order `FlowJoin` relies on: **a frame's report is added before its record**. The
program writes a frame's report before tun queues the frame for QEMU, so a caller that
reads the report rings after a record arrived and adds what it read first meets it. A
record therefore pairs with a pending report of its identity and length (the oldest
of the newest generation that explains it, see `FlowJoin._take`; or, when the host sent
a GSO packet — the tap runs the steering program once, then segments — the segments'
payloads are counted off the flow's open packets) or has none: `Reason.NO_REPORT`
(`Reason.NO_REPORT_NEAR_DETACH` shortly after QEMU detached the program), or, while
reports are sampled (one frame in ``every``),
``not-sampled``, which is no frame of the check. A pending report waits for its record
until `FlowJoin.horizon` later reports were added (frames still on their way to the
guest), then ends unmatched: `Reason.INACTIVE_QUEUE` when every configuration that may
have been in force sends it to a queue beyond the device's active pairs (where such a
frame goes is QEMU's; that it did not reach the guest's recorder is all that is known),
else `Reason.NO_GUEST_RECORD`.

Each pair is judged on the guest's side (the kernel's side of every report is
`vnetbackend.kernel_check`'s): the guest's queue, hash and L4 flag against what the guest
should see (`vnetbackend.checker.expectation`, QEMU's documented departures included)
under the configurations QEMU may have used, which the caller names per report
(`ConfigsSince`): the one that steered the frame in the kernel or one the guest set
after it, since QEMU takes a frame from the tap after the program steered it.

No I/O here: the inputs are `vnetbackend.guest_records.GuestRecord` and
`vnetbackend.steering.reports.Report` objects.
"""

from __future__ import annotations

import collections
import enum
import ipaddress
import itertools
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vnetbackend.checker import Outcome, Tally, expectation
from vnetbackend.guest_records import GuestRecord
from vnetbackend.qemu.departures import DEPARTURES, Departure, Kind
from vnetbackend.rss import RssConfig
from vnetbackend.steering.reports import Report

ETH_HEADER_LEN = 14
_PORTED = (6, 17)
#: Flows tallied one by one; frames of later flows are counted in ``flows-overflow``.
MAX_FLOWS = 256
#: How many later reports a report waits for its guest record (see the module).
HORIZON = 16384
#: How many of a flow's pending reports a record is tried against (a guest's records
#: cannot make the join scan a long backlog per record).
LOOKAHEAD = 256

#: (ip version, src, dst, l4 proto, src port, dst port, length); length is 0 for TCP and
#: UDP (found by order and payload), else the L3 length for IP frames and the frame
#: length for the rest.
FlowKey = tuple[int, bytes, bytes, int, int, int, int]
#: The configurations QEMU may have used for a frame the program steered under a
#: generation: that generation's and every later one's (None where RSS was off).
ConfigsSince = Callable[[int], Sequence[RssConfig | None]]


class Reason(enum.Enum):
    """Why a frame ended unmatched."""

    NO_REPORT = "guest record with no report of its flow and length"
    NO_REPORT_NEAR_DETACH = ("guest record with no report, arriving shortly after QEMU "
                             "detached the program for a guest command (until the daemon "
                             "attached it again, frames steered by tun are not reported)")
    NOT_IP_NO_REPORT = "not IP (no flow identity) and no report of its length"
    SHORT_HEADERS = "the guest could not read the frame's headers"
    NO_GUEST_RECORD = "report with no guest record (not received, or the record was lost)"
    INACTIVE_QUEUE = "report of a frame sent to a queue the device does not serve"
    EXT_HEADERS = "IPv6 extension headers: the identity does not carry what the hash needs"
    RSS_OFF = "no RSS configuration was in force for the frame"


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


def flow_name(key: FlowKey) -> str:
    """A flow as text, e.g. ``tcp 10.0.0.1:80 > 10.0.0.2:1234``, ``ipv6 fd00::1 > fd00::2
    len 104``, ``non_ip len 60``."""
    version, src, dst, proto, src_port, dst_port, length = key
    if version == 0:
        return f"non_ip len {length}"
    source, dest = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if proto in _PORTED:
        name = "tcp" if proto == 6 else "udp"
        if version == 6:
            return f"{name} [{source}]:{src_port} > [{dest}]:{dst_port}"
        return f"{name} {source}:{src_port} > {dest}:{dst_port}"
    return f"ipv{version} {source} > {dest} len {length}"


def frame_class(report: Report) -> str:
    """``ipv4_tcp``, ``ipv6_udp``, ``ipv4_other`` (IP with no transport header that
    counts), ``ipv6_ext_tcp``, ``ipv4_fragment``, ``non_ip``..."""
    if report.ip_version == 0:
        return "non_ip"
    name = f"ipv{report.ip_version}" + ("_ext" if report.has_ext_headers else "")
    if report.fragment:
        return name + "_fragment"
    return name + {6: "_tcp", 17: "_udp"}.get(report.l4_proto, "_other")


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


@dataclass(frozen=True, slots=True)
class FlowVerdict:
    """One joined frame's outcome on the guest's side; ``configs`` is how many
    configurations QEMU may have used (more than one for frames in flight across an RSS
    change)."""

    record: GuestRecord
    report: Report
    outcome: Outcome
    reason: str
    configs: int


def judge_guest(record: GuestRecord, report: Report, configs: Sequence[RssConfig | None],
                departures: Sequence[Departure] = DEPARTURES) -> FlowVerdict:
    """The guest's *record* against what the guest should see for *report*'s frame under
    any of *configs*: agreed (or a departure, or spec-open) if one of them explains it."""
    enabled = [config for config in configs if config is not None]
    if report.has_ext_headers:
        return FlowVerdict(record, report, Outcome.UNMATCHED, Reason.EXT_HEADERS.name,
                           len(configs))
    if not enabled:
        return FlowVerdict(record, report, Outcome.UNMATCHED, Reason.RSS_OFF.name,
                           len(configs))
    frame = identity_frame(report, record.protocol)
    seen = (record.queue, record.hash, record.l4_hash)
    for config in enabled:
        expected = expectation(config, frame, departures)
        if seen != (expected.queue, expected.hash, expected.l4_hash):
            continue
        outcome = Outcome.AGREED
        if expected.departure is not None:
            model = config.steer(frame)
            if (model.queue, model.hash, model.report.is_l4) != seen:
                outcome = (Outcome.DEPARTURE if expected.departure.kind is Kind.DEPARTS
                           else Outcome.SPEC_OPEN)
        return FlowVerdict(record, report, outcome, "", len(configs))
    return FlowVerdict(record, report, Outcome.DISAGREED,
                       "guest differs from the specification", len(configs))


def _queue_inactive(report: Report, configs: Sequence[RssConfig | None],
                    active_pairs: int | None) -> bool:
    """Whether every configuration in *configs* sends *report*'s frame to a queue at or
    beyond *active_pairs* (unknown pairs: no)."""
    enabled = [config for config in configs if config is not None]
    if active_pairs is None or not enabled or report.has_ext_headers:
        return False
    frame = identity_frame(report, 0x0800)
    return all(config.steer(frame).queue >= active_pairs for config in enabled)


@dataclass
class _Pending:
    """A report waiting for its guest record(s); ``payload_left`` counts down a GSO
    packet's payload as its segments arrive (None until the first one)."""

    report: Report
    number: int
    payload_left: int | None = None
    paired: bool = False


@dataclass
class FlowJoin:
    """The streaming join and its tallies (per frame class, per flow, per reason).

    *configs_since* names the configurations for a report's generation (see the module);
    *active_pairs* the queues the device serves now (None: unknown); *sampled* says
    reports cover one frame in several, so a record without report is not a frame of the
    check; *on_verdict* sees every joined frame's final verdict (e.g. to publish
    disagreements). With *hold_disagreements* a pair that disagrees is kept in ``held``
    instead, until `judge_held` judges it again (by then the caller knows every
    configuration QEMU may have used for it) and counts it for good.
    """

    configs_since: ConfigsSince
    departures: Sequence[Departure] = DEPARTURES
    active_pairs: Callable[[], int | None] = lambda: None
    sampled: bool = False
    #: Whether QEMU detached the program shortly before now (see `Reason`).
    detached_recently: Callable[[], bool] = lambda: False
    horizon: int = HORIZON
    on_verdict: Callable[[FlowVerdict], None] | None = None
    hold_disagreements: bool = False
    held: list[tuple[GuestRecord, Report, FlowKey]] = field(default_factory=list)
    totals: Tally = field(default_factory=Tally)
    classes: dict[str, Tally] = field(default_factory=dict)
    flows: dict[FlowKey, Tally] = field(default_factory=dict)
    flows_overflow: int = 0
    unmatched_reasons: Counter[str] = field(default_factory=Counter)
    not_sampled: int = 0
    across_changes: int = 0
    _pending: dict[FlowKey, collections.deque[_Pending]] = field(default_factory=dict)
    _order: collections.deque[tuple[FlowKey, _Pending]] = field(
        default_factory=collections.deque)
    _reports_added: int = 0

    def add_reports(self, reports: Iterable[Report]) -> None:
        """Reports as read from the rings, in order; those older than the horizon that
        found no record end unmatched."""
        for report in reports:
            entry = _Pending(report, self._reports_added)
            self._reports_added += 1
            key = report_key(report)
            self._pending.setdefault(key, collections.deque()).append(entry)
            self._order.append((key, entry))
        self._expire(self._reports_added - self.horizon)

    def add_records(self, records: Iterable[GuestRecord]) -> list[FlowVerdict]:
        """Join and judge *records* (in the recorder's order); every report of their
        frames must have been added already. Returns the verdicts of the joined ones."""
        verdicts = []
        for record in records:
            if record.short:
                self._unmatched(Reason.SHORT_HEADERS, None, record_key(record), record)
                continue
            key = record_key(record)
            report = self._take(key, record)
            if report is None:
                if self.sampled:
                    self.not_sampled += 1
                else:
                    reason = (Reason.NOT_IP_NO_REPORT if not record.ip_version
                              else Reason.NO_REPORT_NEAR_DETACH if self.detached_recently()
                              else Reason.NO_REPORT)
                    self._unmatched(reason, None, key, record)
                continue
            verdict = self._judge(record, report, key, self.hold_disagreements)
            if verdict is not None:
                verdicts.append(verdict)
        return verdicts

    def judge_held(self) -> list[FlowVerdict]:
        """Judge the held pairs again, for good; their verdicts."""
        held, self.held = self.held, []
        return [verdict for record, report, key in held
                if (verdict := self._judge(record, report, key, hold=False)) is not None]

    def _judge(self, record: GuestRecord, report: Report, key: FlowKey,
               hold: bool) -> FlowVerdict | None:
        configs = self.configs_since(report.generation)
        verdict = judge_guest(record, report, configs, self.departures)
        if hold and verdict.outcome is Outcome.DISAGREED:
            self.held.append((record, report, key))
            return None
        self.across_changes += verdict.configs > 1
        if verdict.outcome is Outcome.UNMATCHED:
            self._unmatched(Reason[verdict.reason], report, key, record)
        else:
            self._count(report, key, verdict.outcome)
        if self.on_verdict is not None:
            self.on_verdict(verdict)
        return verdict

    def finish(self) -> None:
        """End the check: every report still waiting for its record is unmatched."""
        self._expire(self._reports_added)

    def _take(self, key: FlowKey, record: GuestRecord) -> Report | None:
        """The pending report *record* is (a segment of), or None.

        Candidates are the flow's waiting reports of the record's length, or, for a
        segment, its GSO reports with payload left (charged as one stream: segments of
        two packets may arrive interleaved). Where the candidates were steered under
        different generations (frames in flight across an RSS change, which may reach
        the guest out of order when the change moved their flow to another queue), the
        newest generation whose configurations explain the record is taken, so a frame
        is not judged under a configuration newer than the one QEMU used for it."""
        waiting = self._pending.get(key)
        if not waiting:
            return None
        open_ = list(itertools.islice((e for e in waiting if not e.paired), LOOKAHEAD))
        exact = [e for e in open_ if e.payload_left is None
                 and e.report.l3_len == record.l3_len]
        segment = [] if exact or not record.header_len else [
            e for e in open_ if e.report.l3_len > record.l3_len and _payload_left(e, record) > 0]
        fits = exact or segment
        if not fits:
            return None
        chosen = fits
        generations = sorted({e.report.generation for e in fits}, reverse=True)
        if len(generations) > 1:
            for generation in generations:
                group = [e for e in fits if e.report.generation == generation]
                if judge_guest(record, group[0].report, self.configs_since(generation),
                               self.departures).outcome is not Outcome.DISAGREED:
                    chosen = group
                    break
        if exact:
            entry: _Pending | None = chosen[0]
            chosen[0].paired = True
        else:
            entry = _charge(chosen, record) or _charge(fits, record)
            if entry is None:
                return None
        if len(waiting) > 2 * LOOKAHEAD:
            waiting = self._pending[key] = collections.deque(
                e for e in waiting if not e.paired)
        while waiting and waiting[0].paired:
            waiting.popleft()
        if not waiting:
            del self._pending[key]
        return entry.report

    def _expire(self, before: int) -> None:
        while self._order and self._order[0][1].number < before:
            key, entry = self._order.popleft()
            if entry.paired:
                continue
            entry.paired = True
            if entry.payload_left is None:  # a segmented one already counted its records
                configs = self.configs_since(entry.report.generation)
                inactive = _queue_inactive(entry.report, configs, self.active_pairs())
                self._unmatched(Reason.INACTIVE_QUEUE if inactive else Reason.NO_GUEST_RECORD,
                                entry.report, key, None)
            waiting = self._pending.get(key)
            while waiting and waiting[0].paired:
                waiting.popleft()
            if waiting is not None and not waiting:
                del self._pending[key]

    def _unmatched(self, reason: Reason, report: Report | None, key: FlowKey,
                   record: GuestRecord | None) -> None:
        self.unmatched_reasons[reason.name] += 1
        name = frame_class(report) if report is not None else _record_class(record)
        self._count_in(name, key, Outcome.UNMATCHED)

    def _count(self, report: Report, key: FlowKey, outcome: Outcome) -> None:
        self._count_in(frame_class(report), key, outcome)

    def _count_in(self, class_name: str, key: FlowKey, outcome: Outcome) -> None:
        self.totals.add(outcome)
        self.classes.setdefault(class_name, Tally()).add(outcome)
        tally = self.flows.get(key)
        if tally is None:
            if len(self.flows) >= MAX_FLOWS:
                self.flows_overflow += 1
                return
            tally = self.flows[key] = Tally()
        tally.add(outcome)

    @property
    def pending(self) -> int:
        """Reports waiting for their guest records."""
        return sum(not entry.paired for _, entry in self._order)

    def summary(self) -> dict[str, Any]:
        return {**vars(self.totals),
                "flows": len(self.flows) + (1 if self.flows_overflow else 0),
                "unmatched-reasons": dict(self.unmatched_reasons),
                "not-sampled": self.not_sampled, "across-changes": self.across_changes,
                "pending-reports": self.pending,
                "classes": {name: vars(t) for name, t in sorted(self.classes.items())},
                "per-flow": {flow_name(key): vars(t) for key, t in self.flows.items()},
                "flows-overflow": self.flows_overflow}


def _record_class(record: GuestRecord | None) -> str:
    if record is None or record.ip_version == 0:
        return "non_ip"
    if record.fragment:
        return f"ipv{record.ip_version}_fragment"
    return f"ipv{record.ip_version}" + {6: "_tcp", 17: "_udp"}.get(record.l4_proto, "_other")


def _payload_left(entry: _Pending, record: GuestRecord) -> int:
    """What is left of *entry*'s GSO payload for segments with *record*'s headers (the
    headers, ``header_len``, repeat in every segment)."""
    if entry.payload_left is not None:
        return entry.payload_left
    return entry.report.l3_len - record.header_len


def _charge(entries: Sequence[_Pending], record: GuestRecord) -> _Pending | None:
    """Count *record*'s payload off *entries* in order (a segment may finish one GSO
    packet's payload and start the next's); the entry it starts in, or None (nothing
    charged) if their payload left does not cover it. An entry whose payload is all
    counted off is paired."""
    payload = record.l3_len - record.header_len
    if sum(_payload_left(e, record) for e in entries) < payload:
        return None
    first = None
    for entry in entries:
        left = _payload_left(entry, record)
        if left <= 0:
            continue
        first = first or entry
        taken = min(left, payload)
        entry.payload_left = left - taken
        entry.paired = entry.payload_left == 0
        payload -= taken
        if payload == 0:
            break
    return first
