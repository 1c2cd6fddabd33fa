"""The vnetbackend command, run as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.prereq import need_root
from vnetbackend.testbed import frames as f

VNETBACKEND = [sys.executable, "-m", "vnetbackend.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VNETBACKEND, *args], capture_output=True, text=True, timeout=120)


def test_hash_prints_one_json_object() -> None:
    frame = f.frame(f.ipv4("66.9.149.187", "161.142.100.80", f.tcp(2794, 1766)))
    done = run("hash", "--key", "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da3"
               "8030f20c6a42b73bbeac01fa", "--types", "ipv4,tcpv4", "--table", "0,1,2,3",
               frame.hex())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "hash": "0x51ccc178", "report_type": "VIRTIO_NET_HASH_REPORT_TCPv4",
        "input": "420995bba18e64500aea06e6", "queue": 0x51CCC178 & 3,
    }


def test_hash_with_a_mask_that_excludes_tcp() -> None:
    frame = f.frame(f.ipv4("66.9.149.187", "161.142.100.80", f.tcp(2794, 1766)))
    out = json.loads(run("hash", "--types", "0x1", frame.hex()).stdout)
    assert (out["hash"], out["report_type"]) == ("0x323e8fc2", "VIRTIO_NET_HASH_REPORT_IPv4")


def test_hash_refuses_bad_input_clearly() -> None:
    bad_types = run("hash", "--types", "ipv4,bogus", "00")
    assert bad_types.returncode == 2 and "bogus" in bad_types.stderr
    bad_frame = run("hash", "zz")
    assert bad_frame.returncode == 2 and "not hex" in bad_frame.stderr
    bad_key = run("hash", "--key", "00" * 41, "00")
    assert bad_key.returncode == 2 and "key" in bad_key.stderr
    bad_table = run("hash", "--table", "0,1,2", "00")
    assert bad_table.returncode == 2 and "indirection_table" in bad_table.stderr


def test_serve_refuses_a_run_directory_others_can_write(tmp_path: Path) -> None:
    need_root()
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o770)
    done = run("serve", "--run-dir", str(shared))
    assert done.returncode == 1
    assert f"run directory {shared}" in done.stderr and "lets group or others write" in done.stderr
    assert list(shared.iterdir()) == []


def test_bench_reference_prints_figures() -> None:
    done = run("bench", "reference", "--json", "--frames", "2000")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert set(figures["cases"]) >= {"ipv4_tcp", "ipv6_udp"}
    assert all(case["frames_per_s"] > 0 for case in figures["cases"].values())


def test_bench_check_prints_figures() -> None:
    done = run("bench", "check", "--json", "--reports", "2000", "--flows", "64",
               "--repeat", "8")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["reports"] == figures["reports_written"] >= 2000
    assert figures["reports_per_s"] > 0
    assert (figures["disagreed"], figures["unjudged"], figures["reports_dropped"]) == (0, 0, 0)
