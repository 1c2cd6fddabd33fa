"""One round: inject a batch into the tap, collect the guest's records of it, check them."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence

from vnetbackend.checker import HashChecker, Outcome, Verdict, guest_key
from vnetbackend.qemu.departures import Departure
from vnetbackend.rss import RssConfig
from vnetbackend.testbed.injector import Injector
from vnetbackend.testbed.observer import RxObserver, RxRecord
from vnetbackend.testbed.traffic import Probe

POLL_INTERVAL = 0.05


async def observe_batch(tap_name: str, observer: RxObserver, probes: Sequence[Probe],
                        timeout: float = 15.0) -> list[RxRecord]:
    """Send *probes* into the tap; the guest's records once every probe was seen once.

    Frames reach the guest asynchronously, so the trace is read until each probe's
    (length, ethertype) appears, or *timeout* passes (then whatever arrived is returned
    and the check reports the missing frames). The trace is cleared before and after.
    """
    await observer.clear()
    with Injector(tap_name) as injector:
        injector.send_all(probe.frame for probe in probes)
    wanted = {guest_key(p.frame) for p in probes}
    deadline = time.monotonic() + timeout
    while True:
        records = await observer.collect(clear=False)
        if wanted <= {(r.l3_len, r.protocol) for r in records} or time.monotonic() > deadline:
            await observer.clear()
            return records
        await asyncio.sleep(POLL_INTERVAL)


def guest_verdicts(config: RssConfig, probes: Sequence[Probe], records: Sequence[RxRecord],
                   departures: Sequence[Departure]) -> list[Verdict]:
    """The guest's side of the check for each probe (no kernel reports involved), with
    *departures* (those of the QEMU in use: `departures_for`) expected."""
    return HashChecker(departures=departures).check(
        config, [(p.frame_class, p.frame) for p in probes], None, records)


def mismatches(verdicts: Sequence[Verdict]) -> list[Verdict]:
    """The verdicts of frames the guest saw differently from the expectation, or not once."""
    return [v for v in verdicts if v.failed]


async def check_batch(tap_name: str, observer: RxObserver, config: RssConfig,
                      probes: Sequence[Probe], departures: Sequence[Departure],
                      ) -> list[Verdict]:
    """Inject, observe and check against the model under *config*; the mismatches."""
    records = await observe_batch(tap_name, observer, probes)
    return mismatches(guest_verdicts(config, probes, records, departures))


def departed(verdicts: Sequence[Verdict]) -> dict[str, int]:
    """Per departure (of either kind), how many frames it gave a steering other than the
    model's."""
    return dict(Counter(v.departure for v in verdicts
                        if v.outcome in (Outcome.DEPARTURE, Outcome.SPEC_OPEN) and v.departure))


def report(config: RssConfig, failed: Sequence[Verdict], limit: int = 20) -> str:
    """A readable list of the first *limit* mismatches."""
    lines = [f"{len(failed)} frames disagree:"]
    lines += [v.describe(config) for v in failed[:limit]]
    return "\n".join(lines)
