"""Reports checked per second, end to end, on one core.

The steering program writes the reports: BPF_PROG_TEST_RUN runs it on a mix of distinct
frames (IPv4 and IPv6, TCP, UDP, other transports, fragments, extension headers with
`_EX` addresses, non-IP), ``--repeat`` runs per frame, into one CPU's report ring; the
configuration is switched halfway through every round, so each batch holds two
generations. Then the daemon's path reads the ring in one batch (`ReportRings.take_batch`)
and judges every record against the reference model of its generation (`KernelCheck`).
The process is pinned to one CPU, so the program's runs, the read and the judging share
that core.

``reports_per_s`` is all of it (writing, reading, judging) over the reports judged;
``read_judge_reports_per_s`` the reading and judging alone (the daemon's own cost per
report). Why numpy: the judging is a table lookup per hash-input byte (the per-position
Toeplitz byte tables), which numpy does over a whole batch at once; a Python loop over
records (bcc's per-record callback, or `RssConfig.steer` per report) costs
microseconds a record.
"""

from __future__ import annotations

import argparse
import os
import random
import time

from vnetbackend.kernel_check import KernelCheck
from vnetbackend.rss import ALL_HASH_TYPES, RssConfig
from vnetbackend.rss.vectors import MICROSOFT_KEY
from vnetbackend.steering import SteeringProgram, prog_test_run
from vnetbackend.testbed import frames as f

TARGET_REPORTS_PER_S = 1_000_000
FLOOR_REPORTS_PER_S = 500_000
#: Records in the ring: one round's reports fit.
RING_SLOTS = 1 << 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reports", type=int, default=2_000_000,
                        help="reports to write and check (default: %(default)s)")
    parser.add_argument("--flows", type=int, default=512,
                        help="distinct frames (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=64,
                        help="runs of the program per frame and round (default: %(default)s)")


def _address(rng: random.Random, version: int) -> str:
    if version == 4:
        return ".".join(str(rng.randrange(256)) for _ in range(4))
    return ":".join(f"{rng.randrange(0x10000):x}" for _ in range(8))


def mixed_frames(count: int, seed: int = 11) -> list[bytes]:
    """*count* distinct frames of the kinds the module docstring lists."""
    rng = random.Random(seed)
    frames = []
    for index in range(count):
        kind = index % 8
        version = 4 if kind < 4 else 6
        src, dst = _address(rng, version), _address(rng, version)
        sport, dport = rng.randrange(1, 0x10000), rng.randrange(1, 0x10000)
        transport = (f.udp(sport, dport) if (kind + index // 8) % 2
                     else f.tcp(sport, dport))
        if kind == 2:
            frames.append(f.frame(f.ipv4(src, dst, f.raw(1, rng.randbytes(8)))))
        elif kind == 3:
            frames.append(f.frame(f.ipv4(src, dst, transport, fragment_offset=8)))
        elif kind == 6:
            ext = [f.hop_by_hop(), f.home_address(_address(rng, 6)),
                   f.routing_type2(_address(rng, 6))]
            frames.append(f.frame(f.ipv6(src, dst, transport, ext=ext)))
        elif kind == 7:
            frames.append(bytes(6) + bytes(6) + b"\x08\x06" + rng.randbytes(28))
        else:
            build = f.ipv4 if version == 4 else f.ipv6
            frames.append(f.frame(build(src, dst, transport)))
    return frames


def _configs() -> tuple[RssConfig, RssConfig]:
    table = [q % 4 for q in range(128)]
    return (RssConfig(hash_types=ALL_HASH_TYPES, key=MICROSOFT_KEY, indirection_table=table,
                      queues=4),
            RssConfig(hash_types=0x3F, key=bytes(range(40)),
                      indirection_table=table[::-1], queues=4))


def run(args: argparse.Namespace) -> dict[str, object]:
    frames = mixed_frames(args.flows)
    per_round = len(frames) * args.repeat
    if per_round > RING_SLOTS:
        raise SystemExit(f"vnetbackend bench check: --flows x --repeat must be at most "
                         f"{RING_SLOTS}")
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    rounds = max(1, -(-args.reports // per_round))
    first, second = _configs()
    half = len(frames) // 2
    judged = disagreed = 0
    read_judge = 0.0
    with SteeringProgram(report_slots=RING_SLOTS) as program:
        rings = program.report_rings()
        check = KernelCheck(program.generation_of)
        program.apply(first)
        program.set_reports(1)
        start = time.perf_counter()
        for index in range(rounds):
            for position, frame in enumerate(frames):
                if position == half:
                    program.apply(second if index % 2 == 0 else first)
                prog_test_run(program.fd, frame, args.repeat)
            taken = time.perf_counter()
            batch = rings.take_batch()
            disagreed += len(check.judge(batch))
            read_judge += time.perf_counter() - taken
            judged += len(batch)
        elapsed = time.perf_counter() - start
        counters = program.counters()
    summary = check.summary()
    return {
        "benchmark": "check",
        "reports": judged,
        "reports_written": counters.reports,
        "reports_dropped": counters.reports_dropped,
        "distinct_frames": len(frames),
        "runs_per_frame": args.repeat,
        "batch": per_round,
        "generations_per_batch": 2,
        "reports_per_s": round(judged / elapsed),
        "read_judge_reports_per_s": round(judged / read_judge),
        "ns_per_report_read_judge": round(read_judge / judged * 1e9, 1),
        "disagreed": disagreed,
        "unjudged": summary["unjudged"],
        "classes": sorted(summary["classes"]),
        "target_reports_per_s": TARGET_REPORTS_PER_S,
        "floor_reports_per_s": FLOOR_REPORTS_PER_S,
        "target_met": judged / elapsed >= TARGET_REPORTS_PER_S,
    }
