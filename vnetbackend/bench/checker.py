"""Throughput of the three-way check: reports joined and judged per second on one core."""

from __future__ import annotations

import argparse
import time

from vnetbackend.checker import HashChecker, expectation
from vnetbackend.rss import RssConfig
from vnetbackend.rss.vectors import MICROSOFT_KEY
from vnetbackend.steering.conformance import expected_report
from vnetbackend.steering.program import SteeringState
from vnetbackend.steering.reports import Report
from vnetbackend.testbed.observer import RxRecord
from vnetbackend.testbed.traffic import make_batch
from vnetbackend.testbed.vm import GUEST_MAC_BYTES

DISTINCT_BATCHES = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reports", type=int, default=200_000,
                        help="reports to check (default: %(default)s)")


def _batch(config: RssConfig, seed: int) -> tuple[list[tuple[str, bytes]], list[Report],
                                                  list[RxRecord]]:
    state = SteeringState(True, True, config)
    frames = [(p.frame_class, p.frame) for p in make_batch(GUEST_MAC_BYTES, per_class=4, seed=seed)]
    reports = [expected_report(state, frame) for _, frame in frames]
    records = [RxRecord.of(frame, expectation(config, frame)) for _, frame in frames]
    return frames, reports, records


def run(args: argparse.Namespace) -> dict[str, object]:
    """Batches of the demo's traffic mix, each frame with the report and guest record the
    kernel and guest would give; only the checker is timed. The batches are all different
    (more frames than any cache holds), so no frame's answer is remembered."""
    config = RssConfig(hash_types=0x3F, key=MICROSOFT_KEY,
                       indirection_table=[q % 4 for q in range(128)], queues=4)
    batches = [_batch(config, seed) for seed in range(DISTINCT_BATCHES)]
    checker = HashChecker()
    per_batch = len(batches[0][0])
    rounds = max(1, args.reports // per_batch)
    start = time.perf_counter()
    for index in range(rounds):
        checker.check(config, *batches[index % DISTINCT_BATCHES])
    elapsed = time.perf_counter() - start
    summary = checker.summary()
    checked = rounds * per_batch
    return {"benchmark": "check", "reports": checked, "batch": per_batch,
            "distinct_frames": DISTINCT_BATCHES * per_batch,
            "reports_per_s": round(checked / elapsed), "us_per_report":
            round(elapsed / checked * 1e6, 3), "disagreed": summary["disagreed"],
            "unmatched": summary["unmatched"], "target_reports_per_s": 100_000}
