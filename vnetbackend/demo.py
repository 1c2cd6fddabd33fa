"""``vnetbackend demo``: the whole prototype on the test guest, with evidence at the end.

It launches the test guest under the daemon (its own tap, QEMU with RSS and hash reports
offered), shows what the guest negotiated, then for a few live RSS configurations set in
the guest with ethtool: waits until the daemon mirrored it into the steering program,
sends the traffic mix into the tap, and joins per frame the specification's answer, the
host kernel's report and what the guest received (`vnetbackend.check`). Then the live
phase: real flows between the host and the guest (TCP, UDP, ping over IPv4 and IPv6)
while the guest changes its RSS configuration three times, checked by the daemon itself
from the guest's recorder on its records port (`vnetbackend.testbed.live`). Progress
goes to stderr; the result is a table per frame class and one per flow, or one JSON
object with ``--json`` (the live phase's under ``"live"``). The exit status is 0 only
when every frame agreed or differs as documented for the QEMU version in use
(`vnetbackend.qemu.departures`: ``departures`` where QEMU departs from the
specification, ``spec open`` where the specification leaves room and QEMU reads it
otherwise than the model) and no live frame disagreed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from vnetbackend.daemon import launch
from vnetbackend.daemon.lifecycle import Daemon
from vnetbackend.qemu.process import listen_unix
from vnetbackend.rss import RssConfig
from vnetbackend.steering.reports import collect_reports
from vnetbackend.testbed.agent import GuestAgent
from vnetbackend.testbed.batch import observe_batch
from vnetbackend.testbed.ethtool import GuestRss
from vnetbackend.testbed.injector import silence_host_stack
from vnetbackend.testbed.live import check_live_traffic
from vnetbackend.testbed.observer import RxObserver
from vnetbackend.testbed.ordinary import Traffic
from vnetbackend.testbed.platform import Platform
from vnetbackend.testbed.traffic import make_batch
from vnetbackend.testbed.vm import GUEST_MAC, GUEST_MAC_BYTES, guest_args, records_port_args

#: The records port's socket in the demo's scratch directory.
RECORDS_SOCKET = "records.sock"
READY_TIMEOUT = 180.0
STEP_TIMEOUT = 60.0
REPORT_TIMEOUT = 15.0

Step = Callable[[GuestRss], Awaitable[None]]


async def _keep(_: GuestRss) -> None:
    """The configuration the guest's driver chose at boot."""


async def _key_equal_4(rss: GuestRss) -> None:
    await rss.set_rxfh(key=bytes(range(0x31, 0x31 + 40)), equal=4)


async def _weighted(rss: GuestRss) -> None:
    await rss.set_rxfh(weights=[1, 3, 0, 2])


async def _narrow_udp(rss: GuestRss) -> None:
    await rss.set_flow_hash("udp4", "sd")
    await rss.set_flow_hash("udp6", "sd")


async def _key_equal_2(rss: GuestRss) -> None:
    await rss.set_rxfh(key=bytes(reversed(range(0x80, 0x80 + 40))), equal=2)


STEPS: tuple[tuple[str, Step], ...] = (
    ("boot-time configuration", _keep),
    ("ethtool -X hkey <A> equal 4", _key_equal_4),
    ("ethtool -X weight 1 3 0 2", _weighted),
    ("ethtool -N rx-flow-hash udp4/udp6 sd", _narrow_udp),
    ("ethtool -X hkey <B> equal 2", _key_equal_2),
)


def progress(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


@dataclass
class StepResult:
    name: str
    frames: int
    latency_ms: float | None


@dataclass
class DemoResult:
    negotiated: list[str] = field(default_factory=list)
    qemu_version: str = ""
    guest_kernel: str = ""
    steps: list[StepResult] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    #: The daemon's live tallies (``vnet-check-stop``'s ``live``).
    live: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        s, live = self.summary, self.live
        return (bool(s) and s["frames"] > 0 and s["disagreed"] == 0 and s["unmatched"] == 0
                and bool(live) and live["frames"] > 0 and live["disagreed"] == 0)

    def as_json(self) -> dict[str, Any]:
        live = {name: self.live.get(name) for name in
                ("frames", "flows", "agreed", "disagreed", "departures", "spec_open",
                 "unmatched", "unmatched-reasons", "rss_changes", "per-flow")}
        return {**self.summary, "negotiated": self.negotiated, "ok": self.ok,
                "qemu_version": self.qemu_version, "guest_kernel": self.guest_kernel,
                "configurations": [vars(step) for step in self.steps], "live": live}


@contextlib.asynccontextmanager
async def _guest_under_daemon(queues: int, work: Path, platform: Platform,
                              ) -> AsyncIterator[tuple[Daemon, GuestAgent, QMPClient]]:
    qemu, image = await platform.resolve()
    agent_path = work / "agent.sock"
    listener = listen_unix(agent_path)
    records = listen_unix(work / RECORDS_SOCKET)
    fd = listener.fileno()
    options = launch.RunOptions(
        qemu_args=tuple(guest_args(image.kernel, image.initrd, append="console=ttyS0 panic=-1",
                                   console_log=work / "console.log", agent_fd=fd,
                                   cpus=queues) + records_port_args(records.fileno())),
        tap_name=f"vnbdemo{os.getpid() % 100000}", queues=queues, run_dir=work / "run",
        monitor=work / "monitor.sock", mac=GUEST_MAC, pass_fds=(fd, records.fileno()),
        qemu=qemu.binary)
    progress(f"launching QEMU with {queues} queue pairs under the daemon (tap "
             f"{options.tap_name})")
    try:
        async with launch.launched(options) as daemon:
            listener.close()
            records.close()
            serving = asyncio.create_task(daemon.serve())
            agent = await GuestAgent.connect(agent_path)
            client = QMPClient("demo")
            try:
                progress("waiting for the guest to boot")
                await asyncio.wait_for(agent.wait_ready(), READY_TIMEOUT)
                await client.connect(str(options.monitor))
                yield daemon, agent, client
            finally:
                await agent.close()
                with contextlib.suppress(EOFError, ConnectionError):
                    await client.disconnect()
                daemon.request_stop("demo over")
                await serving
    finally:
        listener.close()
        records.close()


async def _mirrored(client: QMPClient, guest: RssConfig) -> dict[str, Any]:
    """query-vnet once the daemon's maps hold *guest*'s key, table and hash types."""
    wanted = (guest.key.hex(), list(guest.indirection_table), int(guest.hash_types))

    async def settled() -> dict[str, Any]:
        while True:
            status: dict[str, Any] = await client.execute("query-vnet")
            maps = status["steering"]["rss"]
            if isinstance(maps, dict) and (maps["key"], maps["indirection-table"],
                                           maps["hash-types"]) == wanted:
                return status
            await client.events.get()

    return await asyncio.wait_for(settled(), STEP_TIMEOUT)


async def _run(queues: int, per_class: int, work: Path, platform: Platform) -> DemoResult:
    outcome = DemoResult()
    async with _guest_under_daemon(queues, work, platform) as (daemon, agent, client):
        outcome.qemu_version = ".".join(map(str, daemon.state_reader.qemu_version))
        outcome.guest_kernel = agent.kernel_release or ""
        progress(f"QEMU {outcome.qemu_version}, guest Linux {outcome.guest_kernel}")
        await asyncio.wait_for(daemon.negotiated.wait(), STEP_TIMEOUT)
        outcome.negotiated = daemon.negotiation.view()["negotiated"]
        progress(f"guest negotiated: {', '.join(outcome.negotiated) or 'nothing'}")
        silence_host_stack(daemon.tap_name)
        rss = GuestRss(agent)
        await rss.enable_rxhash()
        observer = RxObserver(agent)
        await observer.start()
        daemon.program.set_reports(1)
        reader = daemon.program.reports()
        for seed, (name, step) in enumerate(STEPS):
            progress(f"configuration {seed + 1}/{len(STEPS)}: {name}")
            await step(rss)
            status = await _mirrored(client, await rss.read_config())
            config = daemon.mirror.status.rss
            assert config is not None
            probes = make_batch(GUEST_MAC_BYTES, per_class=per_class, seed=seed)
            reader.drain()
            records = await observe_batch(daemon.tap_name, observer, probes)
            reports = await collect_reports(reader, [len(p.frame) for p in probes],
                                            REPORT_TIMEOUT)
            verdicts = daemon.checker.check(config, [(p.frame_class, p.frame) for p in probes],
                                            reports, records)
            for verdict in verdicts:
                if verdict.failed:
                    progress(f"  {verdict.outcome.value} {verdict.frame_class}: "
                             f"{verdict.reason}; frame {verdict.frame.hex()}")
            bad = sum(v.failed for v in verdicts)
            progress(f"  {len(probes)} frames checked, {bad} disagreed or unmatched, mirror "
                     f"latency {status['mirror']['last-latency-ms']} ms")
            outcome.steps.append(StepResult(name, len(probes),
                                            status["mirror"]["last-latency-ms"]))
        outcome.summary = daemon.checker.summary()
        daemon.program.set_reports(0)
        progress("live phase: TCP, UDP and ping over IPv4 and IPv6, three RSS changes "
                 "mid-stream, checked by the daemon from the guest's recorder")
        run = await check_live_traffic(client, agent, rss, daemon.tap_name,
                                       work / RECORDS_SOCKET, Traffic())
        outcome.live = run.live
        for change in run.changes:
            progress(f"  changed mid-stream: {change}")
    return outcome


def render_table(outcome: DemoResult) -> str:
    """The per-class table and the per-configuration mirror latencies, as text."""
    columns = {"frames": "frames", "agreed": "agreed", "departures": "departures",
               "spec_open": "spec open", "disagreed": "disagreed", "unmatched": "unmatched"}
    width = max([len("frame class"), *map(len, outcome.summary["classes"])])
    lines = [f"QEMU {outcome.qemu_version}, guest Linux {outcome.guest_kernel}",
             f"negotiated: {', '.join(outcome.negotiated)}", "",
             "frame class".ljust(width) + "".join(f"{c:>12}" for c in columns.values())]
    rows = [*outcome.summary["classes"].items(), ("total", outcome.summary)]
    for name, tally in rows:
        lines.append(name.ljust(width) + "".join(f"{tally[c]:>12}" for c in columns))
    lines += ["", "configuration".ljust(40) + f"{'frames':>8}{'mirror latency':>18}"]
    for step in outcome.steps:
        latency = "-" if step.latency_ms is None else f"{step.latency_ms:.1f} ms"
        lines.append(step.name.ljust(40) + f"{step.frames:>8}{latency:>18}")
    lines += ["", f"unmatched reports: {outcome.summary['unmatched-reports']}, unmatched guest "
              f"records: {outcome.summary['unmatched-guest-records']}", ""]
    lines += render_live(outcome.live)
    lines += [
              "result: " + ("every frame agreed, or differs where QEMU is documented to "
                            "depart from the specification or to read it otherwise"
                            if outcome.ok else "DISAGREEMENT (see VNET_HASH_MISMATCH events)")]
    return "\n".join(lines)


def render_live(live: dict[str, Any]) -> list[str]:
    """The live phase: one row per flow, then the totals and why frames went unmatched."""
    columns = ("frames", "agreed", "departures", "spec_open", "disagreed", "unmatched")
    flows = live["per-flow"]
    width = max([len("flow"), *map(len, flows)])
    lines = ["live: ordinary traffic through "
             f"{live['rss_changes']} RSS changes", "flow".ljust(width)
             + "".join(f"{c.replace('_', ' '):>12}" for c in columns)]
    for name, tally in [*sorted(flows.items()), ("total", live)]:
        lines.append(name.ljust(width) + "".join(f"{tally[c]:>12}" for c in columns))
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(live["unmatched-reasons"].items()))
    return [*lines, f"unmatched: {reasons or 'none'}"]


def main(queues: int, per_class: int, as_json: bool, qemu: str | None = None,
         guest_kernel: str | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="vnetbackend-demo-") as work:
        outcome = asyncio.run(_run(queues, per_class, Path(work), Platform(qemu, guest_kernel)))
    print(json.dumps(outcome.as_json()) if as_json else render_table(outcome))
    return 0 if outcome.ok else 1
