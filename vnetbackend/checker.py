"""The hash check: per frame, the specification, the host kernel and the guest.

For every frame someone sent into the tap, up to three answers are joined:

* the reference model (`RssConfig.steer`) under the configuration the device holds;
* the steering program's report from the host kernel (hash, report type, queue), found
  by the frame's length;
* what the guest's driver received (hash, L4 or not, receive queue), found by the
  frame's L3 length and outer ethertype (any source of records with those fields will
  do).

The kernel agrees when hash, report type and queue equal the model's. What the guest
should see is the model's answer, unless a documented difference of the QEMU version in
use (`vnetbackend.qemu.departures`) recognises the frame: then its account of QEMU is
expected (`expectation`), and a frame for which that differs from the model counts under
``departures`` (QEMU departs from the specification) or ``spec_open`` (the
specification is silent or open there and QEMU reads it otherwise than the model), never
as agreement. A frame without exactly one report and
one guest record is ``unmatched``; reports and guest records that belong to no frame are
counted too, never dropped. Without reports (``reports=None``: the kernel's program took
no part, as in the test bed's guest-only runs) only the guest's side is judged.

Every disagreement is published as a ``VNET_HASH_MISMATCH`` event with all the answers.
"""

from __future__ import annotations

import enum
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vnetbackend.qemu.departures import DEPARTURES, Departure, Kind, find_departure
from vnetbackend.rss import (
    ETH_HEADER_LEN,
    RssConfig,
    Steering,
    outer_ethertype,
    parse_frame,
    rss_view,
)
from vnetbackend.steering.reports import Report

EventSink = Callable[[str, dict[str, Any]], None]


class GuestRecord(Protocol):
    """One frame as the guest's driver received it."""

    @property
    def queue(self) -> int: ...
    @property
    def hash(self) -> int: ...
    @property
    def l4_hash(self) -> bool: ...
    @property
    def l3_len(self) -> int: ...
    @property
    def protocol(self) -> int: ...


def guest_key(frame: bytes) -> tuple[int, int]:
    """How a guest record of *frame* is found: (L3 length, outer ethertype), which is what
    the guest reports as ``len`` and ``protocol``."""
    return len(frame) - ETH_HEADER_LEN, outer_ethertype(frame)


@dataclass(frozen=True, slots=True)
class Expectation:
    """What the guest should see for one frame: queue, hash, L4 or not."""

    queue: int
    hash: int
    l4_hash: bool
    departure: Departure | None = None

    @classmethod
    def from_steering(cls, steering: Steering,
                      departure: Departure | None = None) -> Expectation:
        return cls(steering.queue, steering.hash, steering.report.is_l4, departure)

    def describe(self) -> str:
        how = f" (departure {self.departure.name})" if self.departure else ""
        return f"queue {self.queue} hash 0x{self.hash:08x} l4 {int(self.l4_hash)}{how}"


def _expect(config: RssConfig, frame: bytes, departures: Sequence[Departure],
            ) -> tuple[Steering, Expectation]:
    """The model's steering of *frame*, and what the guest should see."""
    parsed = parse_frame(frame)
    model = config.steer_parsed(parsed)
    departure = find_departure(config, frame, parsed, departures)
    if departure is None:
        return model, Expectation.from_steering(model)
    return model, Expectation.from_steering(departure.qemu_steer(config, frame), departure)


def expectation(config: RssConfig, frame: bytes,
                departures: Sequence[Departure] = DEPARTURES) -> Expectation:
    """The model's steering for *frame*, or a matching departure's account of QEMU's."""
    return _expect(config, frame, departures)[1]


class Outcome(enum.Enum):
    AGREED = "agreed"
    DISAGREED = "disagreed"
    DEPARTURE = "departures"
    SPEC_OPEN = "spec_open"
    UNMATCHED = "unmatched"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answers for one frame and what they add up to."""

    frame_class: str
    frame: bytes
    model: Steering
    expected: Expectation
    kernel: tuple[Report, ...] | None
    guest: tuple[GuestRecord, ...]
    outcome: Outcome
    reason: str = ""

    @property
    def departure(self) -> str | None:
        return self.expected.departure.name if self.expected.departure else None

    @property
    def failed(self) -> bool:
        return self.outcome in (Outcome.DISAGREED, Outcome.UNMATCHED)

    def describe(self, config: RssConfig) -> str:
        """The frame, the configuration, the expectation and what was seen, as text."""
        seen = "; ".join(f"queue {r.queue} hash 0x{r.hash:08x} l4 {int(r.l4_hash)}"
                         for r in self.guest) or "nothing"
        kernel = "" if self.kernel is None else "\n  kernel: " + ("; ".join(
            f"queue {r.queue} hash 0x{r.hash:08x} {r.report.virtio_name}"
            for r in self.kernel) or "nothing")
        return (f"{self.frame_class} ({self.reason})\n"
                f"  config: types 0x{int(config.hash_types):x} key {config.key.hex()} "
                f"queues {config.queues} table {list(config.indirection_table)}\n"
                f"  frame: {self.frame.hex()}\n"
                f"  expected: {self.expected.describe()}{kernel}\n  guest: {seen}")


@dataclass
class Tally:
    frames: int = 0
    agreed: int = 0
    disagreed: int = 0
    departures: int = 0
    spec_open: int = 0
    unmatched: int = 0

    def add(self, outcome: Outcome) -> None:
        self.frames += 1
        name = outcome.value
        setattr(self, name, getattr(self, name) + 1)


def _one(found: tuple[Any, ...] | None) -> Any:
    return found[0] if found is not None and len(found) == 1 else None


def _model_view(model: Steering) -> dict[str, Any]:
    return {"hash": f"0x{model.hash:08x}", "report-type": model.report.virtio_name,
            "queue": model.queue}


def _kernel_view(report: Report | None) -> dict[str, Any] | None:
    if report is None:
        return None
    return {"hash": f"0x{report.hash:08x}", "report-type": report.report.virtio_name,
            "queue": report.queue}


def _guest_view(record: GuestRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {"hash": f"0x{record.hash:08x}", "l4-hash": record.l4_hash, "queue": record.queue}


@dataclass
class HashChecker:
    """Checks frames as they come and keeps the tallies ``query-vnet-check`` returns."""

    publish: EventSink | None = None
    departures: Sequence[Departure] = DEPARTURES
    classes: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    unmatched_reports: int = 0
    unmatched_guest_records: int = 0

    def check(self, config: RssConfig, frames: Sequence[tuple[str, bytes]],
              reports: Iterable[Report] | None,
              records: Iterable[GuestRecord]) -> list[Verdict]:
        """Join one batch of (frame class, frame) with its reports and guest records.

        Frames in a batch must differ in length (that is how they are found).
        """
        by_length: dict[int, list[Report]] = defaultdict(list)
        for report in reports or ():
            by_length[report.frame_len].append(report)
        by_key: dict[tuple[int, int], list[GuestRecord]] = defaultdict(list)
        for record in records:
            by_key[record.l3_len, record.protocol].append(record)
        verdicts = []
        for frame_class, frame in frames:
            kernel = None if reports is None else tuple(by_length.pop(len(frame), ()))
            guest = tuple(by_key.pop(guest_key(frame), ()))
            verdict = self._judge(config, frame_class, frame, kernel, guest)
            self.classes[frame_class].add(verdict.outcome)
            if verdict.outcome is Outcome.DISAGREED and self.publish is not None:
                self.publish("VNET_HASH_MISMATCH", self._event(config, verdict))
            verdicts.append(verdict)
        self.unmatched_reports += sum(map(len, by_length.values()))
        self.unmatched_guest_records += sum(map(len, by_key.values()))
        return verdicts

    def _judge(self, config: RssConfig, frame_class: str, frame: bytes,
               kernel: tuple[Report, ...] | None, guest: tuple[GuestRecord, ...]) -> Verdict:
        model, expected = _expect(config, frame, self.departures)
        one_report, one_record = _one(kernel), _one(guest)
        outcome, reason = Outcome.AGREED, ""
        if (kernel is not None and one_report is None) or one_record is None:
            outcome = Outcome.UNMATCHED
            reports = "" if kernel is None else f"{len(kernel)} reports, "
            reason = f"{reports}{len(guest)} guest records"
        else:
            reasons = []
            if one_report is not None and (
                    one_report.hash, one_report.report, one_report.queue) != model[:3]:
                reasons.append("kernel differs from the specification")
            if (one_record.queue, one_record.hash, one_record.l4_hash) != (
                    expected.queue, expected.hash, expected.l4_hash):
                reasons.append("guest differs from the " + (
                    f"documented departure {expected.departure.name}" if expected.departure
                    else "specification"))
            if reasons:
                outcome, reason = Outcome.DISAGREED, "; ".join(reasons)
            elif expected.departure and (expected.queue, expected.hash, expected.l4_hash) != (
                    model.queue, model.hash, model.report.is_l4):
                outcome = (Outcome.DEPARTURE if expected.departure.kind is Kind.DEPARTS
                           else Outcome.SPEC_OPEN)
        return Verdict(frame_class, frame, model, expected, kernel, guest, outcome, reason)

    @staticmethod
    def _event(config: RssConfig, verdict: Verdict) -> dict[str, Any]:
        return {
            "frame-class": verdict.frame_class,
            "frame": verdict.frame.hex(),
            "reason": verdict.reason,
            "config": rss_view(config),
            "specification": _model_view(verdict.model),
            "kernel": _kernel_view(_one(verdict.kernel)),
            "guest": _guest_view(_one(verdict.guest)),
            "departure": verdict.departure,
        }

    def summary(self) -> dict[str, Any]:
        """Totals and per-class tallies since the checker started."""
        totals: Counter[str] = Counter()
        classes = {}
        for name, tally in sorted(self.classes.items()):
            classes[name] = vars(tally).copy()
            totals.update(classes[name])
        return {
            "frames": totals["frames"],
            "agreed": totals["agreed"],
            "disagreed": totals["disagreed"],
            "departures": totals["departures"],
            "spec_open": totals["spec_open"],
            "unmatched": totals["unmatched"],
            "unmatched-reports": self.unmatched_reports,
            "unmatched-guest-records": self.unmatched_guest_records,
            "classes": classes,
        }
