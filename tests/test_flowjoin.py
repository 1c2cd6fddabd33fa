"""The streaming join of guest records with kernel reports, on ordinary-traffic shapes.

Hashes come from Microsoft's published verification vectors (independent of the model);
queues from the indirection table by hand (hash mod 128 -> table entry).
"""

from __future__ import annotations

import dataclasses
import ipaddress

from vnetbackend.flowjoin import FlowJoin
from vnetbackend.guest_records import GuestRecord
from vnetbackend.rss import RssConfig
from vnetbackend.rss.types import HashReport, HashType
from vnetbackend.rss.vectors import MICROSOFT_IPV4_VECTORS, MICROSOFT_IPV6_VECTORS, MICROSOFT_KEY
from vnetbackend.steering.reports import Report

ALL_TYPES = int(HashType.IPV4 | HashType.TCPV4 | HashType.UDPV4 | HashType.IPV6
                | HashType.TCPV6 | HashType.UDPV6)
TABLE = tuple(i % 4 for i in range(128))
CONFIG = RssConfig(hash_types=ALL_TYPES, key=MICROSOFT_KEY, indirection_table=TABLE, queues=4)
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


def report_of(f: dict, l3_len: int, table: tuple[int, ...] = TABLE, hash_: int | None = None,
              generation: int = 1) -> Report:
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
                  frame_len=l3_len + 14, has_ext_headers=False, fragment=False,
                  generation=generation)


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


def fixed(generation: int) -> tuple[RssConfig, ...]:
    return (CONFIG,)


def streamed(records: list[GuestRecord], reports: list[Report], join: FlowJoin,
             chunk: int = 37) -> FlowJoin:
    """Feed *join* as a daemon does: the reports of a chunk of frames, then their records
    (every report before its record), chunk by chunk; then end the check."""
    for start in range(0, max(len(records), len(reports)), chunk):
        join.add_reports(reports[start:start + chunk])
        join.add_records(records[start:start + chunk])
    join.finish()
    return join


def test_published_hashes_agree_and_every_frame_is_accounted_for() -> None:
    records, reports = traffic()
    records.insert(17, arp_record())  # the guest's own ARP reply: no report kept
    join = streamed(records, reports, FlowJoin(fixed))
    assert join.totals.frames == len(reports) + 1
    assert join.totals.agreed == len(reports)
    assert join.totals.disagreed == 0
    assert dict(join.unmatched_reasons) == {"NOT_IP_NO_REPORT": 1}
    summary = join.summary()
    # TCP and UDP flows by ports; other IP by length too (two per flow); the ARP record.
    ported = sum(f["l4_proto"] in (6, 17) for f in FLOWS)
    assert summary["flows"] == ported + 2 * (len(FLOWS) - ported) + 1
    assert sum(t["frames"] for t in summary["per-flow"].values()) == len(records)
    assert summary["pending-reports"] == 0


def test_a_removed_report_is_unmatched_never_agreed() -> None:
    records, reports = traffic()
    del reports[40]
    join = streamed(records, reports, FlowJoin(fixed))
    assert join.totals.agreed == len(reports)
    assert dict(join.unmatched_reasons) == {"NO_REPORT": 1}
    assert join.totals.frames == len(records)


def test_with_sampled_reports_a_record_without_one_is_no_frame_of_the_check() -> None:
    records, reports = traffic(per_flow=10)
    kept = reports[::3]
    join = FlowJoin(fixed, sampled=True)
    join.add_reports(kept)
    join.add_records(records)
    join.finish()
    assert (join.totals.frames, join.totals.agreed) == (len(kept), len(kept))
    assert join.not_sampled == len(records) - len(kept)


def test_a_lost_guest_record_leaves_its_report_pending_then_unmatched() -> None:
    records, reports = traffic()
    del records[3]
    join = FlowJoin(fixed)
    join.add_reports(reports)
    join.add_records(records)
    assert join.pending == 1 and join.totals.unmatched == 0
    join.finish()
    assert dict(join.unmatched_reasons) == {"NO_GUEST_RECORD": 1}
    assert join.totals.agreed == len(records)


def test_a_report_waits_for_its_record_only_as_long_as_the_horizon() -> None:
    _, reports = traffic(per_flow=20)
    join = FlowJoin(fixed, horizon=50)
    join.add_reports(reports[:1])
    join.add_reports(reports[1:50])
    assert join.pending == 50
    join.add_reports(reports[50:51])  # the first report is now 50 reports old
    assert join.pending == 50 and dict(join.unmatched_reasons) == {"NO_GUEST_RECORD": 1}


def test_a_frame_sent_to_a_queue_the_device_does_not_serve_is_said_so() -> None:
    _, reports = traffic(per_flow=3)
    join = FlowJoin(fixed, active_pairs=lambda: 2)
    join.add_reports(reports)
    join.finish()  # no records: queues 2 and 3 of the table are not served
    inactive = sum(1 for r in reports if r.queue >= 2)
    assert join.unmatched_reasons == {"INACTIVE_QUEUE": inactive,
                                      "NO_GUEST_RECORD": len(reports) - inactive}


def test_a_wrong_guest_hash_or_queue_disagrees() -> None:
    records, reports = traffic(per_flow=3)
    records[2] = dataclasses.replace(records[2], hash=records[2].hash ^ 1)
    records[5] = dataclasses.replace(records[5], queue=3)
    seen: list[str] = []
    join = FlowJoin(fixed, on_verdict=lambda v: seen.append(v.outcome.value))
    streamed(records, reports, join)
    # The one moved to queue 3 disagrees unless 3 was its queue already.
    expected = 2 - (FLOWS[5]["hash"] % 128 % 4 == 3)
    assert join.totals.disagreed == expected == seen.count("disagreed")


def test_frames_in_flight_across_a_change_are_judged_under_the_old_or_a_later_one() -> None:
    # Generation 1 spreads frames over four queues, generation 2 sends all to queue 3;
    # QEMU may take a frame the program steered under 1 after the guest set 2.
    def since(generation: int) -> tuple[RssConfig, ...]:
        return (CONFIG, ALL_TO_3)[generation - 1:]

    records, reports = traffic(per_flow=4)
    half = len(reports) // 2
    records[half:] = [dataclasses.replace(r, queue=3) for r in records[half:]]
    moved = FlowJoin(since)
    streamed(records, reports, moved)  # every report says generation 1
    assert moved.totals.agreed == len(reports)
    assert moved.across_changes == len(reports)
    # Under generation 2 alone, a frame on its generation-1 queue disagrees: QEMU never
    # goes back to a configuration the guest replaced.
    later = [dataclasses.replace(r, generation=2) for r in reports]
    back = FlowJoin(since)
    streamed(records, later, back)
    assert back.totals.disagreed == sum(1 for r in records[:half] if r.queue != 3)


def test_the_segments_of_a_gso_packet_share_its_one_report() -> None:
    # The host's TCP hands the tap 4396 bytes of IPv4 (20 + 32 bytes of headers, three
    # 1448-byte segments' worth): one report; the guest receives three 1500-byte frames.
    f = FLOWS[0]
    report = report_of(f, 4396)
    segments = [dataclasses.replace(record_of(f, 1500), header_len=52) for _ in range(3)]
    ack = report_of(f, 52)
    ack_record = dataclasses.replace(record_of(f, 52), header_len=52)
    join = FlowJoin(fixed)
    join.add_reports([report, ack])
    verdicts = join.add_records([*segments, ack_record])
    assert [v.report for v in verdicts] == [report] * 3 + [ack]
    join.finish()
    assert join.totals.unmatched == 0 and join.totals.agreed == 4
    # A segment longer than what is left of the packet is no segment of it.
    late = FlowJoin(fixed)
    late.add_reports([report])
    late.add_records([*segments[:2], dataclasses.replace(segments[2], l3_len=1600)])
    assert dict(late.unmatched_reasons) == {"NO_REPORT": 1}


def test_a_held_disagreement_is_judged_again_once_a_later_configuration_is_known() -> None:
    # The guest already received frames under a configuration the daemon has not read
    # yet (every frame to queue 3); held, they agree once it is known, never before.
    known: list[RssConfig] = [CONFIG]
    records, reports = traffic(per_flow=2)
    moved = [dataclasses.replace(r, queue=3) for r in records]
    join = FlowJoin(lambda generation: tuple(known), hold_disagreements=True)
    join.add_reports(reports)
    join.add_records(moved)
    off_queue_3 = sum(1 for r in records if r.queue != 3)
    assert len(join.held) == off_queue_3 and join.totals.disagreed == 0
    known.append(ALL_TO_3)
    assert [v.outcome.value for v in join.judge_held()] == ["agreed"] * off_queue_3
    assert join.totals.agreed == len(records) and join.held == []
    # Still wrong under every configuration: a disagreement, for good.
    wrong = FlowJoin(lambda generation: (CONFIG,), hold_disagreements=True)
    wrong.add_reports(reports)
    wrong.add_records(moved)
    wrong.judge_held()
    assert wrong.totals.disagreed == off_queue_3


def test_frames_reordered_across_a_change_pair_with_the_generation_that_explains_them() -> None:
    # The change moved a flow to queue 3: its first frames under the new configuration
    # (generation 2) reach the guest before the last ones under the old (generation 1),
    # which came on their old queue. Frames of one identity are interchangeable but for
    # the configuration: each record takes a report of a generation that explains it.
    def since(generation: int) -> tuple[RssConfig, ...]:
        return (CONFIG, ALL_TO_3)[generation - 1:]

    f = next(f for f in FLOWS if f["l4_proto"] in (6, 17) and f["hash"] % 128 % 4 != 3)
    old = [report_of(f, 300, generation=1) for _ in range(3)]
    new = [report_of(f, 300, table=(3,) * 128, generation=2) for _ in range(3)]
    records_old = [record_of(f, 300) for _ in range(3)]
    records_new = [record_of(f, 300, table=(3,) * 128) for _ in range(3)]
    join = FlowJoin(since)
    join.add_reports(old + new)
    verdicts = join.add_records(records_new[:2] + records_old + records_new[2:])
    assert join.totals.agreed == 6 and join.totals.disagreed == 0
    assert [v.report.generation for v in verdicts] == [2, 2, 1, 1, 1, 2]


def test_interleaved_segments_of_two_gso_packets_are_counted_off_as_one_stream() -> None:
    # Two packets of one flow (3 and 2 segments' payload), their segments arriving
    # interleaved; the last segment of each is short.
    f = FLOWS[0]
    first, second = report_of(f, 52 + 1448 * 2 + 700), report_of(f, 52 + 1448 + 300)
    full = dataclasses.replace(record_of(f, 1500), header_len=52)
    short_a = dataclasses.replace(record_of(f, 752), header_len=52)
    short_b = dataclasses.replace(record_of(f, 352), header_len=52)
    join = FlowJoin(fixed)
    join.add_reports([first, second])
    join.add_records([full, full, short_b, full, short_a])
    join.finish()
    assert join.totals.agreed == 5 and join.totals.unmatched == 0 and join.pending == 0
