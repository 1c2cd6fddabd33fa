"""The steering benchmark runs and says what it measured (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.prereq import need_bcc


def test_bench_steering_prints_one_json_object() -> None:
    need_bcc()
    out = subprocess.run([sys.executable, "-m", "vnetbackend.cli", "bench", "steering",
                          "--json", "--rounds", "1"], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    figures = json.loads(out)
    assert set(figures["cases"]) == {"ipv4_tcp", "ipv6_udp", "ipv6_ext", "non_ip"}
    for case in figures["cases"].values():
        assert case["ns"] > 0 and case["ns_reports"] > 0 and case["ns_reports_unread"] > 0
    assert figures["empty_ns"] > 0
    assert figures["repeat"] >= 100_000
    assert figures["reports_dropped"] == 0
    assert figures["reports_written"] == 4 * 2 * figures["repeat"]
    assert isinstance(figures["targets_met"], bool)
