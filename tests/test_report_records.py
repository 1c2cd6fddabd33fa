"""Decoding the report rings' records: whole records become reports, others are counted."""

from __future__ import annotations

from vnetbackend.rss import HashReport
from vnetbackend.steering.layout import SteeringReport
from vnetbackend.steering.reports import ReportReader


class Ring:
    """A stand-in for the report rings: the records written so far, handed out once."""

    fd = -1

    def __init__(self) -> None:
        self.records: list[bytes] = []

    def take(self) -> list[bytes]:
        taken, self.records = self.records, []
        return taken

    def skip(self) -> int:
        return len(self.take())


def record(**values: int) -> bytes:
    return bytes(SteeringReport(**values))


def test_whole_records_are_reports_and_the_rest_are_counted() -> None:
    ring = Ring()
    reader = ReportReader(ring)
    good = record(hash=0x51CCC178, queue=3, report_type=int(HashReport.TCPV4), ip_version=4)
    ring.records = [
        good,
        good[:-1],  # one byte short
        record(hash=1, queue=0, report_type=10, ip_version=4),  # no such report type
        b"",
        good + b"\0" * 8,  # longer than a record: the record part is read
    ]
    reports = reader.drain()
    assert [(r.hash, r.queue, r.report, r.ip_version) for r in reports] == [
        (0x51CCC178, 3, HashReport.TCPV4, 4)] * 2
    assert reader.malformed == 3
    assert reader.drain() == []
