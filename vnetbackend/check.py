"""The three-way hash check: per frame, the specification, the host kernel and the guest.

For every frame someone sent into the tap, three answers are joined:

* the reference model (`RssConfig.steer`) under the configuration the device holds;
* the steering program's report from the host kernel (hash, report type, queue), found
  by the frame's length;
* what the guest's driver received (hash, L4 or not, receive queue), found by the
  frame's L3 length and ethertype (any source of records with those fields will do).

The kernel agrees when hash, report type and queue equal the model's; the guest agrees
when hash, L4 flag and queue equal the model's. A frame that a documented QEMU departure
(`vnetbackend.qemu.departures`) recognises is expected from the guest as the departure
says; when that differs from the model the frame counts under ``departures``, never as
agreement. A frame without exactly one report and one guest record is ``unmatched``;
reports and guest records that belong to no frame are counted too, never dropped.
Every disagreement is published as a ``VNET_HASH_MISMATCH`` event with all three answers.
"""

from __future__ import annotations

import enum
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vnetbackend.mirror import describe
from vnetbackend.qemu.departures import DEPARTURES, Departure, find_departure
from vnetbackend.rss import RssConfig, Steering, parse_frame
from vnetbackend.steering.reports import Report

ETH_HEADER = 14
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


class Outcome(enum.Enum):
    AGREED = "agreed"
    DISAGREED = "disagreed"
    DEPARTURE = "departures"
    UNMATCHED = "unmatched"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The three answers for one frame and what they add up to."""

    frame_class: str
    frame: bytes
    model: Steering
    kernel: Report | None
    guest: GuestRecord | None
    departure: str | None
    outcome: Outcome
    reason: str = ""


@dataclass
class Tally:
    frames: int = 0
    agreed: int = 0
    disagreed: int = 0
    departures: int = 0
    unmatched: int = 0

    def add(self, outcome: Outcome) -> None:
        self.frames += 1
        if outcome is Outcome.AGREED:
            self.agreed += 1
        elif outcome is Outcome.DISAGREED:
            self.disagreed += 1
        elif outcome is Outcome.DEPARTURE:
            self.departures += 1
        else:
            self.unmatched += 1


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
              reports: Iterable[Report], records: Iterable[GuestRecord]) -> list[Verdict]:
        """Join one batch of (frame class, frame) with its reports and guest records.

        Frames in a batch must differ in length (that is how they are found).
        """
        by_length: dict[int, list[Report]] = defaultdict(list)
        for report in reports:
            by_length[report.frame_len].append(report)
        by_key: dict[tuple[int, int], list[GuestRecord]] = defaultdict(list)
        for record in records:
            by_key[record.l3_len, record.protocol].append(record)
        verdicts = []
        for frame_class, frame in frames:
            kernel = by_length.pop(len(frame), [])
            guest = by_key.pop((len(frame) - ETH_HEADER, _ethertype(frame)), [])
            verdict = self._judge(config, frame_class, frame, kernel, guest)
            self.classes[frame_class].add(verdict.outcome)
            if verdict.outcome is Outcome.DISAGREED and self.publish is not None:
                self.publish("VNET_HASH_MISMATCH", self._event(config, verdict))
            verdicts.append(verdict)
        self.unmatched_reports += sum(map(len, by_length.values()))
        self.unmatched_guest_records += sum(map(len, by_key.values()))
        return verdicts

    def _judge(self, config: RssConfig, frame_class: str, frame: bytes,
               kernel: list[Report], guest: list[GuestRecord]) -> Verdict:
        parsed = parse_frame(frame)
        model = config.steer_parsed(parsed)
        found = find_departure(config, frame, parsed, self.departures)
        departure = found.name if found else None
        seen_model = (model.hash, model.report.is_l4, model.queue)
        expected = seen_model
        if found:
            qemu = found.qemu_steer(config, frame)
            expected = (qemu.hash, qemu.report.is_l4, qemu.queue)
        one_report = kernel[0] if len(kernel) == 1 else None
        one_record = guest[0] if len(guest) == 1 else None
        outcome, reason = Outcome.AGREED, ""
        if one_report is None or one_record is None:
            outcome = Outcome.UNMATCHED
            reason = f"{len(kernel)} reports, {len(guest)} guest records"
        else:
            reasons = []
            if (one_report.hash, one_report.report, one_report.queue) != model[:3]:
                reasons.append("kernel differs from the specification")
            if (one_record.hash, one_record.l4_hash, one_record.queue) != expected:
                reasons.append("guest differs from the " + (
                    f"documented departure {departure}" if departure else "specification"))
            if reasons:
                outcome, reason = Outcome.DISAGREED, "; ".join(reasons)
            elif expected != seen_model:
                outcome = Outcome.DEPARTURE
        return Verdict(frame_class, frame, model, one_report, one_record, departure, outcome,
                       reason)

    @staticmethod
    def _event(config: RssConfig, verdict: Verdict) -> dict[str, Any]:
        return {
            "frame-class": verdict.frame_class,
            "frame": verdict.frame.hex(),
            "reason": verdict.reason,
            "config": describe(config),
            "specification": _model_view(verdict.model),
            "kernel": _kernel_view(verdict.kernel),
            "guest": _guest_view(verdict.guest),
            "departure": verdict.departure,
        }

    def summary(self) -> dict[str, Any]:
        """Totals and per-class tallies since the daemon started."""
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
            "unmatched": totals["unmatched"],
            "unmatched-reports": self.unmatched_reports,
            "unmatched-guest-records": self.unmatched_guest_records,
            "classes": classes,
        }


def _ethertype(frame: bytes) -> int:
    """What the guest reports as ``protocol``: the outer ethertype (a VLAN TPID if tagged)."""
    return int.from_bytes(frame[12:14], "big") if len(frame) >= 14 else 0
