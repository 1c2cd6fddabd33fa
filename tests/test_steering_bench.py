"""The steering benchmark runs and says what it measured (no timing is asserted); its
bit-by-bit yardstick computes the hashes Microsoft publishes and the model's reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.prereq import need_bcc
from vnetbackend.bench.samples import sample_frames
from vnetbackend.bench.steering import bitwise_program
from vnetbackend.rss import HashType, RssConfig
from vnetbackend.rss.vectors import MICROSOFT_IPV4_VECTORS, MICROSOFT_IPV6_VECTORS, MICROSOFT_KEY
from vnetbackend.steering import SteeringState
from vnetbackend.steering.conformance import expected_report, run_frames
from vnetbackend.testbed import frames as f


def test_bench_steering_prints_one_json_object() -> None:
    need_bcc()
    out = subprocess.run([sys.executable, "-m", "vnetbackend.cli", "bench", "steering",
                          "--json", "--rounds", "1"], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    figures = json.loads(out)
    assert set(figures["cases"]) == {"ipv4_tcp", "ipv6_udp", "ipv6_ext", "non_ip"}
    for case in figures["cases"].values():
        for figure in ("ns", "ns_reports", "ns_reports_unread", "ns_bitwise", "empty_ns"):
            assert case[figure] > 0
        # One round: each ratio is that round's own, to its case's empty program (the
        # printed times are rounded to 0.1 ns, the ratios computed before).
        assert abs(case["ratio_to_bitwise"] - case["ns"] / case["ns_bitwise"]) < 0.02
        assert abs(case["bitwise_ratio"] - case["ns_bitwise"] / case["empty_ns"]) < 0.02
        assert abs(case["ratio_reports"] - case["ns_reports"] / case["empty_ns"]) < 0.02
    empties = sorted(case["empty_ns"] for case in figures["cases"].values())
    assert figures["empty_ns"] == round((empties[1] + empties[2]) / 2, 1)
    assert figures["cpu"] in os.sched_getaffinity(0)
    assert figures["repeat"] >= 100_000
    assert figures["reports_dropped"] == 0
    assert figures["reports_written"] == 4 * 2 * figures["repeat"]
    assert figures["targets_met"] == (figures["targets_missed"] == [])
    assert set(figures["targets_missed"]) <= set(figures["targets"])


def test_the_bitwise_build_gives_the_published_hashes_and_the_models_reports() -> None:
    need_bcc()
    vectors = [(f.ipv4, v) for v in MICROSOFT_IPV4_VECTORS]
    vectors += [(f.ipv6, v) for v in MICROSOFT_IPV6_VECTORS]
    frames = [f.frame(build(src, dst, f.tcp(sport, dport)))
              for build, (src, sport, dst, dport, _, _) in vectors]
    others = [*sample_frames().values(),
              f.frame(f.ipv6("2001:db8::1", "2001:db8::2", f.udp(1, 2),
                             ext=[f.home_address("2001:db8::3"),
                                  f.routing_type2("2001:db8::4")]))]
    with bitwise_program() as program:
        for types, published in ((HashType(0x1FF), 5), (HashType.IPV4 | HashType.IPV6, 4)):
            config = RssConfig(hash_types=types, key=MICROSOFT_KEY,
                               indirection_table=range(8), queues=8)
            program.apply(config)
            results = run_frames(program, frames + others)
            for (_, vector), (_, report) in zip(vectors, results, strict=False):
                assert report.hash == vector[published]
            state = SteeringState(True, True, config)
            for frame, (retval, report) in zip(frames + others, results, strict=True):
                assert (retval, report) == (report.queue, expected_report(state, frame))
