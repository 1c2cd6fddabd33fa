"""Ordinary traffic, checked live: the guest's recorder joined with the kernel's reports.

Real stacks at both ends (TCP bulk flows to busybox nc in the guest, UDP, ping and
ping6 both ways) while the guest changes its RSS configuration three times; every frame
the guest received and every report ends agreed, disagreed or unmatched with a reason.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from vnetbackend.flowjoin import Reason, check_flows, join
from vnetbackend.testbed.bed import VnetGuest
from vnetbackend.testbed.live_check import RssChange, check_ordinary_traffic
from vnetbackend.testbed.ordinary import Traffic

KEY_B = bytes(range(7, 47))

CHANGES = [
    RssChange(3000, "ethtool -X hkey <B> equal 4",
              lambda rss: rss.set_rxfh(KEY_B, equal=4)),
    RssChange(6500, "ethtool -N rx-flow-hash udp4 sd",
              lambda rss: rss.set_flow_hash("udp4", "sd")),
    RssChange(9000, "ethtool -X weight 1 3 0 2", lambda rss: rss.set_rxfh(weights=[1, 3, 0, 2])),
]


def flow_kinds(run) -> dict[str, int]:
    """Distinct flows among joined frames, by kind."""
    kinds: dict[str, set] = {}
    for verdict in run.check.verdicts:
        r = verdict.report
        name = {6: "tcp", 17: "udp"}.get(r.l4_proto, "ip")
        kinds.setdefault(f"{name}v{r.ip_version}", set()).add(
            (r.src, r.dst, r.l4_proto, r.src_port, r.dst_port))
    return {kind: len(flows) for kind, flows in sorted(kinds.items())}


@pytest.mark.asyncio
@pytest.mark.vnet_guest(queues=4)
async def test_ordinary_traffic_agrees_through_rss_changes(vnet_guest: VnetGuest) -> None:
    run = await check_ordinary_traffic(vnet_guest, Traffic(), CHANGES)
    tally = run.check.tally()
    kinds = flow_kinds(run)
    print(json.dumps({"tally": tally, "flows": kinds, "changes": run.changes,
                      "records": len(run.records), "reports": len(run.reports),
                      "recorder": run.recorder}, indent=1))
    disagreed = [(v.reason, dataclasses.asdict(v.record), v.report)
                 for v in run.check.verdicts if v.outcome.value == "disagreed"]
    assert disagreed[:5] == []
    assert len(run.changes) == 3
    assert tally["agreed"] >= 10_000
    assert sum(kinds.values()) >= 8
    assert {"tcpv4", "tcpv6", "udpv4", "udpv6"} <= set(kinds) and (
        "ipv4" in kinds and "ipv6" in kinds)  # ICMP and ICMPv6 (ping, ping6, ND)
    assert tally["unmatched"] < tally["frames"] / 100, tally["unmatched-reasons"]
    assert run.recorder["bad-lines"] == 0

    # A report removed on purpose: its frame is unmatched, never agreed.
    index = run.check.verdicts[len(run.check.verdicts) // 2]
    position = next(i for i, r in enumerate(run.reports) if r is index.report)
    fewer = run.reports[:position] + run.reports[position + 1:]
    before = join(run.records, run.reports)
    after = join(run.records, fewer)
    assert len(after.pairs) == len(before.pairs) - 1
    assert after.unmatched_by_reason()[Reason.NO_REPORT.name] == (
        before.unmatched_by_reason()[Reason.NO_REPORT.name] + 1)
    assert check_flows(run.records, fewer, run.kernel, run.guest).tally()["agreed"] < (
        tally["agreed"])
