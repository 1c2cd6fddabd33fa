"""Joining guest records with kernel reports by flow, on ordinary-traffic shapes.

Hashes come from Microsoft's published verification vectors (independent of the model);
queues from the indirection table by hand (hash mod 128 -> table entry).
"""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from vnetbackend.checker import Outcome
from vnetbackend.flowjoin import ConfigTimeline, FlowJoinError, Reason, check_flows, join
from vnetbackend.guest_records import GuestRecord
from vnetbackend.rss import RssConfig
from vnetbackend.rss.types import HashReport, HashType
from vnetbackend.rss.vectors import MICROSOFT_IPV4_VECTORS, MICROSOFT_IPV6_VECTORS, MICROSOFT_KEY
from vnetbackend.steering.reports import Report

ALL_TYPES = int(HashType.IPV4 | HashType.TCPV4 | HashType.UDPV4 | HashType.IPV6
                | HashType.TCPV6 | HashType.UDPV6)
TABLE = tuple(i % 4 for i in range(128))
CONFIG = RssConfig(hash_types=ALL_TYPES, key=MICROSOFT_KEY, indirection_table=TABLE, queues=4)
FIXED = ConfigTimeline(CONFIG)
#: Another configuration: every frame to queue 3.
ALL_TO_3 = RssConfig(hash_types=ALL_TYPES, key=MICROSOFT_KEY, indirection_table=(3,) * 128,
                     queues=4)
_seq = iter(range(10**9))


def flow(vector: tuple, proto: int, version: int) -> dict:
    src, sport, dst, dport, ip_hash, l4_hash = vector
    ported = proto in (6, 17)
    return {"ip_version": version, "src": ipaddress.ip_address(src).packed,
            "dst": ipaddress.ip_address(dst).packed, "l4_proto": proto,
            "src_port": sport if ported else 0, "dst_port": dport if ported else 0,
            "hash": l4_hash if ported else ip_hash}


def report_of(f: dict, l3_len: int, table: tuple[int, ...] = TABLE, hash_: int | None = None
              ) -> Report:
    value = f["hash"] if hash_ is None else hash_
    kind = {(4, 6): HashReport.TCPV4, (4, 17): HashReport.UDPV4, (6, 6): HashReport.TCPV6,
            (6, 17): HashReport.UDPV6}.get((f["ip_version"], f["l4_proto"]),
                                           HashReport.IPV4 if f["ip_version"] == 4
                                           else HashReport.IPV6)
    ported = f["l4_proto"] in (6, 17)
    return Report(queue=table[value % 128], hash=value, report=kind,
                  ip_version=f["ip_version"], src=f["src"], dst=f["dst"],
                  l4_proto=f["l4_proto"] if ported else 0, src_port=f["src_port"],
                  dst_port=f["dst_port"], l3_offset=14, l3_len=l3_len,
                  frame_len=l3_len + 14, has_ext_headers=False, fragment=False)


def record_of(f: dict, l3_len: int, table: tuple[int, ...] = TABLE, hash_: int | None = None
              ) -> GuestRecord:
    value = f["hash"] if hash_ is None else hash_
    return GuestRecord(seq=next(_seq), cpu=0, queue=table[value % 128], hash=value,
                       l4_hash=f["l4_proto"] in (6, 17),
                       protocol=0x800 if f["ip_version"] == 4 else 0x86DD, l3_len=l3_len,
                       ip_version=f["ip_version"], l4_proto=f["l4_proto"],
                       src_port=f["src_port"], dst_port=f["dst_port"], src=f["src"],
                       dst=f["dst"], flags=0)


def arp_record() -> GuestRecord:
    return GuestRecord(seq=next(_seq), cpu=1, queue=0, hash=0, l4_hash=False, protocol=0x806,
                       l3_len=28, ip_version=0, l4_proto=0, src_port=0, dst_port=0, src=b"",
                       dst=b"", flags=0)


FLOWS = ([flow(v, 6, 4) for v in MICROSOFT_IPV4_VECTORS[:3]]
         + [flow(MICROSOFT_IPV4_VECTORS[3], 17, 4), flow(MICROSOFT_IPV4_VECTORS[4], 1, 4)]
         + [flow(MICROSOFT_IPV6_VECTORS[0], 6, 6), flow(MICROSOFT_IPV6_VECTORS[1], 17, 6),
            flow(MICROSOFT_IPV6_VECTORS[2], 58, 6)])


def traffic(per_flow: int = 50) -> tuple[list[GuestRecord], list[Report]]:
    """Interleaved flows, most frames of one length (bulk), some retransmitted twice."""
    records, reports = [], []
    for i in range(per_flow):
        for f in FLOWS:
            length = 1500 if i % 7 else 52  # bulk segments and pure ACK-sized ones
            copies = 2 if i % 13 == 5 else 1  # a retransmission: the same frame again
            for _ in range(copies):
                reports.append(report_of(f, length))
                records.append(record_of(f, length))
    return records, reports


def test_published_hashes_agree_and_every_frame_is_accounted_for() -> None:
    records, reports = traffic()
    records.insert(17, arp_record())  # the guest's own ARP reply: no report kept
    result = check_flows(records, reports, FIXED, FIXED)
    tally = result.tally()
    assert tally["frames"] == len(reports) + 1
    assert tally["agreed"] == len(reports)
    assert tally["disagreed"] == 0
    assert tally["unmatched-reasons"] == {"NOT_IP_NO_REPORT": 1}


def test_a_removed_report_is_unmatched_never_agreed() -> None:
    records, reports = traffic()
    del reports[40]
    result = check_flows(records, reports, FIXED, FIXED)
    tally = result.tally()
    assert tally["agreed"] == len(reports)
    assert tally["unmatched-reasons"] == {"NO_REPORT": 1}
    assert tally["frames"] == len(records)


def test_a_lost_guest_record_leaves_its_report_unmatched() -> None:
    records, reports = traffic()
    del records[3]
    result = join(records, reports)
    assert [u.reason for u in result.unmatched] == [Reason.NO_GUEST_RECORD]
    assert len(result.pairs) == len(records)


def test_a_wrong_guest_hash_or_queue_disagrees() -> None:
    records, reports = traffic(per_flow=3)
    records[2] = dataclasses.replace(records[2], hash=records[2].hash ^ 1)
    records[5] = dataclasses.replace(records[5], queue=3)
    tally = check_flows(records, reports, FIXED, FIXED).tally()
    # The one moved to queue 3 disagrees unless 3 was its queue already.
    assert tally["disagreed"] == 2 - (FLOWS[5]["hash"] % 128 % 4 == 3)


def test_a_wrong_kernel_report_disagrees() -> None:
    records, reports = traffic(per_flow=2)
    reports[0] = report_of(FLOWS[0], reports[0].l3_len, hash_=0x12345678)
    result = check_flows(records, reports, FIXED, FIXED)
    assert [v.reason for v in result.verdicts if v.outcome is Outcome.DISAGREED] == [
        "kernel differs from the specification"]


def test_frames_across_a_change_are_judged_under_either_configuration_only() -> None:
    records, reports = traffic(per_flow=4)
    # Half-way the guest moved every frame to queue 3: records and reports of the second
    # half say queue 3.
    half = len(reports) // 2
    records[half:] = [record_of(FLOWS[i % len(FLOWS)], r.l3_len, table=(3,) * 128)
                      for i, r in enumerate(records[half:], start=half)]
    reports[half:] = [report_of(FLOWS[i % len(FLOWS)], r.l3_len, table=(3,) * 128)
                      for i, r in enumerate(reports[half:], start=half)]
    kernel = ConfigTimeline(CONFIG)
    kernel.change(half - 8, half + 8, ALL_TO_3)
    guest = ConfigTimeline(CONFIG)
    guest.change(records[half - 4].seq, records[half + 4].seq, ALL_TO_3)
    tally = check_flows(records, reports, kernel, guest).tally()
    assert tally["agreed"] == len(reports)
    assert tally["across-changes"] == 16
    # Judged under the old configuration alone, the second half disagrees.
    wrong = check_flows(records, reports, FIXED, FIXED).tally()
    assert wrong["disagreed"] >= sum(1 for r in reports[half:] if r.hash % 128 % 4 != 3)


def test_change_spans_must_run_forward() -> None:
    timeline = ConfigTimeline(CONFIG)
    timeline.change(10, 20, ALL_TO_3)
    assert (timeline.at(9), timeline.at(10), timeline.at(20)) == (
        (CONFIG,), (CONFIG, ALL_TO_3), (ALL_TO_3,))
    with pytest.raises(FlowJoinError, match="overlaps"):
        timeline.change(15, 30, CONFIG)
    with pytest.raises(FlowJoinError, match="backwards"):
        ConfigTimeline(CONFIG).change(5, 4, CONFIG)


def test_the_segments_of_a_gso_packet_share_its_one_report() -> None:
    # The host's TCP hands the tap 4396 bytes of IPv4 (20 + 32 bytes of headers, three
    # 1448-byte segments' worth): one report; the guest receives three 1500-byte frames.
    f = FLOWS[0]
    report = report_of(f, 4396)
    segments = [dataclasses.replace(record_of(f, 1500), header_len=52) for _ in range(3)]
    ack = report_of(f, 52)
    ack_record = dataclasses.replace(record_of(f, 52), header_len=52)
    result = join([*segments, ack_record], [report, ack])
    assert [index for _, index in result.pairs] == [0, 0, 0, 1]
    assert result.unmatched == []
    # Two segments do not add up to the packet: nothing pairs with its report.
    short = join(segments[:2], [report])
    assert short.pairs == [] and short.unmatched_by_reason() == {
        "NO_REPORT": 2, "NO_GUEST_RECORD": 1}
