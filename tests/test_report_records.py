"""Decoding the report rings' records: records become reports, unknown report types are
counted; a pump's batches reach its `on_batch` first and its other callers after."""

from __future__ import annotations

import numpy as np

from vnetbackend.rss import HashReport
from vnetbackend.steering.layout import SteeringReport
from vnetbackend.steering.reports import RECORD_DTYPE, ReportReader


class Ring:
    """A stand-in for the report rings: the records written so far, handed out once."""

    fd = -1

    def __init__(self) -> None:
        self.records: list[bytes] = []

    def take_batch(self) -> np.ndarray:
        taken, self.records = self.records, []
        return np.frombuffer(b"".join(taken), RECORD_DTYPE).copy()

    def skip(self) -> int:
        return len(self.take_batch())


def record(**values: int) -> bytes:
    return bytes(SteeringReport(**values))


def test_records_are_reports_and_unknown_report_types_are_counted() -> None:
    ring = Ring()
    reader = ReportReader(ring)
    good = record(hash=0x51CCC178, queue=3, report_type=int(HashReport.TCPV4), ip_version=4,
                  generation=7)
    ring.records = [
        good,
        record(hash=1, queue=0, report_type=10, ip_version=4),  # no such report type
        good,
    ]
    reports = reader.drain()
    assert [(r.hash, r.queue, r.report, r.ip_version, r.generation) for r in reports] == [
        (0x51CCC178, 3, HashReport.TCPV4, 4, 7)] * 2
    assert reader.malformed == 1
    assert reader.drain() == []


def test_batches_go_to_on_batch_and_the_last_ones_stay_for_drain() -> None:
    ring = Ring()
    reader = ReportReader(ring, retain=2)
    seen: list[int] = []
    reader.on_batch = lambda batch: seen.extend(batch["hash"].tolist())
    for value in (1, 2, 3):
        ring.records = [record(hash=value, report_type=0)]
        reader.take_batch()
    assert seen == [1, 2, 3]
    assert [r.hash for r in reader.drain()] == [2, 3]
    assert reader.not_retained == 1
