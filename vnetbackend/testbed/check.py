"""Comparing what the guest received with what the reference model predicts, frame by frame.

Each injected `Probe` is looked up among the guest's `RxRecord`s by (L3 length,
ethertype), which a batch makes unique. Its expectation is the model's steering decision
under the configuration read back from the guest, unless a documented QEMU departure
(`vnetbackend.qemu.departures`) recognises the frame: then the departure's account of
what QEMU does is expected instead. `departed` counts the frames for which that account
differs from the model, so that a test can show each departure really occurred.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from vnetbackend.qemu.departures import DEPARTURES, Departure, Expectation, expectation
from vnetbackend.rss import RssConfig
from vnetbackend.testbed.observer import RxRecord
from vnetbackend.testbed.traffic import Probe


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


def departed(config: RssConfig, probes: Sequence[Probe],
             departures: Sequence[Departure] = DEPARTURES) -> dict[str, int]:
    """Per departure, how many *probes* it gives a steering other than the model's."""
    counts: dict[str, int] = {}
    for probe in probes:
        expected = expectation(config, probe.frame, departures)
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
        expected = expectation(config, probe.frame, departures)
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
