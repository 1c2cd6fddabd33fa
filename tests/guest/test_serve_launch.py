"""``vnetbackend serve`` as a process: VMs it launches (paused QEMUs, no guest boot), its
monitor's answers to bad requests, its capabilities, and the scale benchmark."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from tests.guest.conftest import need_guest
from tests.prereq import need_bcc
from vnetbackend import tap
from vnetbackend.bench.scale import PAUSED_QEMU, serve_daemon
from vnetbackend.daemon.privileges import QEMU_USER, SERVE_CAPABILITIES, qemu_user

pytestmark = pytest.mark.guest


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict((key, value.strip()) for key, value in
                (line.split(":", 1) for line in text.splitlines() if ":" in line))


async def _refused(client: QMPClient, command: str, args: dict[str, Any]) -> str:
    with pytest.raises(ExecuteError) as refused:
        await client.execute(command, args)
    return str(refused.value)


def _launch(vm_id: str, tap_name: str) -> dict[str, Any]:
    return {"id": vm_id, "tap": tap_name, "queues": 2, "qemu-args": list(PAUSED_QEMU)}


async def test_serve_launches_confined_vms_with_only_its_capabilities(tmp_path: Path) -> None:
    need_guest()
    need_bcc()
    user = qemu_user(QEMU_USER)
    taps = [f"vsl{os.getpid() % 10000}x{n}" for n in range(2)]
    async with serve_daemon(tmp_path / "run", QEMU_USER) as (process, client):
        kept = int(_status(process.pid)["CapEff"], 16)
        assert kept == sum(1 << cap for cap in SERVE_CAPABILITIES)
        first = await client.execute("vnet-add-vm", _launch("a", taps[0]))
        second = await client.execute("vnet-add-vm", _launch("b", taps[1]))
        for vm, name in ((first, taps[0]), (second, taps[1])):
            assert (vm["state"], vm["mode"], vm["tap"]) == ("running", "launched", name)
            qemu = _status(vm["qemu-pid"])
            assert qemu["Uid"].split()[0] == str(user.uid)
            assert int(qemu["CapEff"], 16) == 0
            assert tap.tap_exists(name)
        status = await client.execute("query-vnet", {"id": "b"})
        assert (status["tap"], status["queues"], status["qemu-pid"]) == (
            taps[1], 2, second["qemu-pid"])
        assert (await client.execute("vnet-set-reports", {"id": "a", "enable": True,
                                                          "every": 4}))["report-every"] == 4
        assert (await client.execute("query-vnet", {"id": "a"}))["steering"][
            "report-every"] == 4
        assert (await client.execute("query-vnet", {"id": "b"}))["steering"][
            "report-every"] == 0

        assert "argument 'id' is needed: this daemon serves 2 VMs" in await _refused(
            client, "query-vnet", {})
        assert "no VM with id 'c'" in await _refused(client, "query-vnet-check", {"id": "c"})
        assert "a VM with id 'a' exists already" in await _refused(
            client, "vnet-add-vm", _launch("a", "vslother"))
        assert f"tap '{taps[0]}' is VM 'a'" in await _refused(
            client, "vnet-add-vm", _launch("c", taps[0]))
        assert "VM id '../x'" in await _refused(client, "vnet-add-vm", _launch("../x", "t"))
        assert "not both" in await _refused(client, "vnet-add-vm", {
            **_launch("d", "vsld"), "qmp": str(tmp_path / "nothing.sock")})
        assert "array of strings" in await _refused(client, "vnet-add-vm", {
            **_launch("e", "vsle"), "qemu-args": ["-S", 3]})
        failed = await _refused(client, "vnet-add-vm", {
            "id": "f", "tap": "vslf", "qmp": str(tmp_path / "nothing.sock")})
        assert "VM 'f' could not be set up" in failed and "nothing.sock" in failed
        assert [vm["id"] for vm in await client.execute("query-vnet-vms")] == ["a", "b"]
        assert not tap.tap_exists("vsld") and not tap.tap_exists("vsle")

        removed = await client.execute("vnet-remove-vm", {"id": "a"})
        assert (removed["ending"], removed["reason"]) == ("requested", "removed on the monitor")
        assert not tap.tap_exists(taps[0])
        assert not Path(f"/proc/{first['qemu-pid']}").exists() or \
            _status(first["qemu-pid"])["State"].startswith("Z")
    assert process.returncode == 0
    assert not tap.tap_exists(taps[1])


def test_bench_scale_prints_its_figures() -> None:
    need_guest()
    need_bcc()
    result = subprocess.run([sys.executable, "-m", "vnetbackend.cli", "bench", "scale",
                             "--json", "--vms", "1,3", "--queues", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["vms"] == [1, 3] and figures["running_at_end"] == 3
    assert len(figures["rss_mb"]) == len(figures["add_ms"]) == 2
    assert figures["rss_mb_no_vm"] <= figures["rss_mb"][0] + 1
    # RSS figures are rounded to 0.1 MB, per_vm_mb is worked out before rounding.
    assert abs(figures["per_vm_mb"] - (figures["rss_mb"][1] - figures["rss_mb"][0]) / 2) <= 0.06
    assert all(ms > 0 for ms in figures["add_ms"]) and figures["run_rss_mb"] > 0


def test_bench_scale_refuses_counts_out_of_order() -> None:
    result = subprocess.run([sys.executable, "-m", "vnetbackend.cli", "bench", "scale",
                             "--json", "--vms", "4,1"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "counts must rise" in result.stderr


async def test_serve_ends_on_sigterm_and_stops_its_vms(tmp_path: Path) -> None:
    need_guest()
    need_bcc()
    name = f"vst{os.getpid() % 10000}"
    async with serve_daemon(tmp_path / "run", QEMU_USER) as (process, client):
        vm = await client.execute("vnet-add-vm", _launch("only", name))
        assert (await client.execute("query-vnet"))["qemu-pid"] == vm["qemu-pid"]
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 60) == 0
    assert not tap.tap_exists(name)
    assert not Path(f"/proc/{vm['qemu-pid']}").exists()
