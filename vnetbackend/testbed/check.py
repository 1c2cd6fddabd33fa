"""Comparing what the guest received with what the reference model predicts, frame by frame.

Each injected `Probe` is looked up among the guest's `RxRecord`s by (L3 length,
ethertype), which a batch makes unique. Its expectation is the model's steering decision
under the configuration read back from the guest, unless a documented QEMU departure
(`vnetbackend.testbed.departures`) recognises the frame: then the departure's account of
what QEMU does is expected instead. `departed` counts the frames for which that account
differs from the model, so that a test can show each departure really occurred.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from vnetbackend.rss import RssConfig, Steering
from vnetbackend.testbed.departures import DEPARTURES, Departure
from vnetbackend.testbed.observer import RxRecord
from vnetbackend.testbed.traffic import Probe


@dataclass(frozen=True, slots=True)
class Expectation:
    """What the guest should see for one frame: queue, hash, L4 or not."""

    queue: int
    hash: int
    l4_hash: bool
    departure: str | None = None

    @classmethod
    def from_steering(cls, steering: Steering, departure: str | None = None) -> Expectation:
        return cls(steering.queue, steering.hash, steering.report.is_l4, departure)

    def describe(self) -> str:
        how = f" (departure {self.departure})" if self.departure else ""
        return f"queue {self.queue} hash 0x{self.hash:08x} l4 {int(self.l4_hash)}{how}"


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One frame the guest saw differently from the expectation, or not once."""

    probe: Probe
    expected: Expectation
    seen: tuple[RxRecord, ...]
    reason: str

    def describe(self, config: RssConfig) -> str:
        seen = "; ".join(f"queue {r.queue} hash 0x{r.hash:08x} l4 {int(r.l4_hash)}"
                         for r in self.seen) or "nothing"
        return (f"{self.probe.frame_class} ({self.reason})\n"
                f"  config: types 0x{int(config.hash_types):x} key {config.key.hex()} "
                f"queues {config.queues} table {list(config.indirection_table)}\n"
                f"  frame: {self.probe.frame.hex()}\n"
                f"  expected: {self.expected.describe()}\n  seen: {seen}")


def expectation(config: RssConfig, probe: Probe,
                departures: Sequence[Departure] = DEPARTURES) -> Expectation:
    """The model's steering for *probe*, or a matching departure's account of QEMU's."""
    for departure in departures:
        if departure.applies(config, probe.frame):
            return Expectation.from_steering(departure.qemu_steer(config, probe.frame),
                                             departure.name)
    return Expectation.from_steering(config.steer(probe.frame))


def departed(config: RssConfig, probes: Sequence[Probe],
             departures: Sequence[Departure] = DEPARTURES) -> dict[str, int]:
    """Per departure, how many *probes* it gives a steering other than the model's."""
    counts: dict[str, int] = {}
    for probe in probes:
        expected = expectation(config, probe, departures)
        if expected.departure and expected != Expectation.from_steering(
                config.steer(probe.frame), expected.departure):
            counts[expected.departure] = counts.get(expected.departure, 0) + 1
    return counts


def compare(config: RssConfig, probes: Sequence[Probe], records: Sequence[RxRecord],
            departures: Sequence[Departure] = DEPARTURES) -> list[Mismatch]:
    """Every probe whose guest record is missing, ambiguous or differs from expectation."""
    by_key: dict[tuple[int, int], list[RxRecord]] = defaultdict(list)
    for record in records:
        by_key[record.l3_len, record.protocol].append(record)
    mismatches = []
    for probe in probes:
        expected = expectation(config, probe, departures)
        seen = tuple(by_key.get((probe.l3_len, probe.ethertype), ()))
        reason = None
        if len(seen) != 1:
            reason = f"received {len(seen)} times"
        elif (seen[0].queue, seen[0].hash, seen[0].l4_hash) != (
                expected.queue, expected.hash, expected.l4_hash):
            reason = "differs"
        if reason:
            mismatches.append(Mismatch(probe, expected, seen, reason))
    return mismatches


def unexpected_records(probes: Sequence[Probe], records: Sequence[RxRecord]) -> list[RxRecord]:
    """Records that belong to no probe (traffic nobody injected)."""
    keys = {(p.l3_len, p.ethertype) for p in probes}
    return [r for r in records if (r.l3_len, r.protocol) not in keys]
