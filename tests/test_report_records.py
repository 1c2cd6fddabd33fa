"""Decoding the report ring's records: whole records become reports, others are counted."""

from __future__ import annotations

import ctypes as ct
from collections.abc import Callable
from typing import Any

from vnetbackend.rss import HashReport
from vnetbackend.steering.layout import SteeringReport
from vnetbackend.steering.reports import ReportReader

Callback = Callable[[Any, int, int], int]


class Ring:
    """What bcc gives the reader: a registration for its callback, and a consume call
    that hands it the records written so far."""

    def __init__(self) -> None:
        self.records: list[bytes] = []
        self._callback: Callback | None = None

    def open(self, callback: Callback) -> None:
        self._callback = callback

    def consume(self) -> None:
        assert self._callback is not None
        for record in self.records:
            buffer = ct.create_string_buffer(record, len(record))
            self._callback(None, ct.addressof(buffer), len(record))
        self.records.clear()


def record(**values: int) -> bytes:
    return bytes(SteeringReport(**values))


def test_whole_records_are_reports_and_the_rest_are_counted() -> None:
    ring = Ring()
    reader = ReportReader(ring.open, ring.consume, ring_fd=-1)
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
