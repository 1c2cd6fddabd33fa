"""The mirror benchmark runs against a real guest and says what it measured (no timing
is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.guest.conftest import need_guest
from tests.prereq import need_bcc

pytestmark = pytest.mark.guest
CHANGES = 5


def test_bench_mirror_prints_one_latency_per_change() -> None:
    need_guest()
    need_bcc()
    result = subprocess.run([sys.executable, "-m", "vnetbackend.cli", "bench", "mirror",
                             "--json", "--changes", str(CHANGES)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["benchmark"] == "mirror"
    assert figures["changes"] == CHANGES
    assert figures["syncs"] == CHANGES  # one snapshot per guest command
    # QEMU says STOP before it saves: its part is measured apart, up to the device's
    # state read from the file as it was written (or up to its RESUME and reply).
    stages = set(figures["stages_ms"])
    assert {"trace-seen", "qmp-request", "read", "parse", "validate", "maps",
            "attach"} <= stages
    assert "state-written" in stages or {"vm-pause", "qmp-resume"} <= stages
    # Each change parted into QEMU's pause and the daemon's rest.
    assert set(figures["split_ms"]) == {"qemu", "daemon"}
    for part in figures["split_ms"].values():
        assert 0 < part["p50"] <= part["p99"] <= figures["max_ms"]
    assert figures["boot_s"] > 0
    assert 0 < figures["min_ms"] <= figures["p50_ms"] <= figures["p90_ms"] <= figures["p99_ms"]
    assert figures["p99_ms"] <= figures["max_ms"]
    assert figures["min_ms"] <= figures["mean_ms"] <= figures["max_ms"]


def test_bench_mirror_refuses_a_change_count_out_of_range() -> None:
    result = subprocess.run([sys.executable, "-m", "vnetbackend.cli", "bench", "mirror",
                             "--json", "--changes", "0"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "--changes: must be 1..999, got 0" in result.stderr
    assert result.stdout == ""
