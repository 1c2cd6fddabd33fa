"""Ordinary traffic, checked live by the daemon: the guest's records joined with reports.

Real stacks at both ends (TCP bulk flows to busybox nc in the guest over IPv4 and IPv6,
UDP, ping and ping6 both ways) while the guest changes its RSS configuration three
times; the daemon reads the guest's recorder on its records port and the steering
program's reports, and every frame ends agreed, disagreed, a departure or unmatched with
a reason. The expectations are the reference model's, recomputed by the daemon; the
reports' and records' values come from the kernel and from QEMU through the guest.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from vnetbackend.flowjoin import FlowJoin, flow_name, report_key
from vnetbackend.guest_records import GuestRecord
from vnetbackend.steering.reports import Report
from vnetbackend.testbed.bed import VnetGuest
from vnetbackend.testbed.live import STANDARD_CHANGES, check_live_traffic
from vnetbackend.testbed.ordinary import Traffic


@pytest.mark.asyncio
@pytest.mark.vnet_guest(queues=4)
async def test_ordinary_traffic_agrees_through_rss_changes(
        vnet_guest: VnetGuest, monkeypatch: pytest.MonkeyPatch) -> None:
    guest = vnet_guest.guest
    # One report of a TCP flow removed on purpose before the join sees it: its frame
    # shows as unmatched, and no verdict ever stands on that report.
    removed: list[Report] = []
    judged: list[Report] = []
    add_reports, judge = FlowJoin.add_reports, FlowJoin._judge

    def drop_one(join: FlowJoin, reports: Iterable[Report]) -> None:
        kept = list(reports)
        if not removed and join.totals.frames > 5000:
            tcp = next((r for r in kept if r.l4_proto == 6 and r.l3_len > 100), None)
            if tcp is not None:
                removed.append(tcp)
                kept = [r for r in kept if r is not tcp]
        add_reports(join, kept)

    def note(join: FlowJoin, record: GuestRecord, report: Report, *rest: Any) -> Any:
        judged.append(report)
        return judge(join, record, report, *rest)

    monkeypatch.setattr(FlowJoin, "add_reports", drop_one)
    monkeypatch.setattr(FlowJoin, "_judge", note)
    # A records port that cannot be read is a clear error, and no check is left running.
    with pytest.raises(ExecuteError, match="argument 'records': cannot read"):
        await vnet_guest.monitor.execute("vnet-check-start",
                                         {"records": str(guest.paths.records_socket) + ".x"})
    assert (await vnet_guest.monitor.execute("query-vnet"))["steering"]["report-every"] == 0
    run = await check_live_traffic(vnet_guest.monitor, guest.agent, vnet_guest.rss,
                                   guest.tap_name, guest.paths.records_socket, Traffic())
    live, kernel = run.live, run.kernel
    print(json.dumps({"live": {k: v for k, v in live.items() if k != "per-flow"},
                      "kernel": kernel, "changes": run.changes, "sent": run.sent}, indent=1))
    assert run.changes == [c.describe for c in STANDARD_CHANGES]
    assert live["rss_changes"] >= 2
    assert live["disagreed"] == 0, live["classes"]
    assert kernel["disagreed"] == 0 and kernel["unjudged"] == 0
    assert live["frames"] >= 10_000
    flows = live["per-flow"]
    assert len(flows) >= 8
    kinds = {name.split()[0] for name, tally in flows.items() if tally["agreed"]}
    assert {"tcp", "udp", "ipv4", "ipv6"} <= kinds, sorted(flows)  # ICMP: ipv4, ipv6
    assert any(name.startswith("tcp [") for name in flows)  # TCP over IPv6
    assert any(name.startswith("udp [") for name in flows)
    assert live["unmatched"] < live["frames"] / 100, live["unmatched-reasons"]
    assert sum(live["unmatched-reasons"].values()) == live["unmatched"]
    port = live["records-port"]
    assert port["bad-lines"] == 0 and port["lost"] == 0, port
    assert live["records-dropped"] == 0 and live["pending-reports"] == 0
    assert sum(t["frames"] for t in flows.values()) == live["frames"]
    assert removed and not any(report is removed[0] for report in judged)
    flow = flow_name(report_key(removed[0]))
    assert flows[flow]["unmatched"] >= 1, flows[flow]
