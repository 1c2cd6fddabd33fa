"""Throughput of the reference model: frames steered per second on one core."""

from __future__ import annotations

import argparse
import time

from vnetbackend.bench.samples import sample_frames
from vnetbackend.rss import ALL_HASH_TYPES, RssConfig
from vnetbackend.rss.vectors import MICROSOFT_KEY

#: IPv4/TCP frames the model must steer per second on one core.
TARGET_IPV4_TCP = 500_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=200_000,
                        help="frames steered per case (default: %(default)s)")


def run(args: argparse.Namespace) -> dict[str, object]:
    config = RssConfig(hash_types=ALL_HASH_TYPES, key=MICROSOFT_KEY,
                       indirection_table=range(128), queues=128)
    cases: dict[str, dict[str, float]] = {}
    for name, frame in sample_frames().items():
        rounds = args.frames
        start = time.perf_counter()
        for _ in range(rounds):
            config.steer(frame)
        elapsed = time.perf_counter() - start
        cases[name] = {"frames_per_s": round(rounds / elapsed), "us_per_frame":
                       round(elapsed / rounds * 1e6, 3)}
    ipv4_tcp = cases["ipv4_tcp"]["frames_per_s"]
    return {"benchmark": "reference", "frames": args.frames, "cases": cases,
            "target_ipv4_tcp_frames_per_s": TARGET_IPV4_TCP,
            "targets_met": ipv4_tcp >= TARGET_IPV4_TCP}
