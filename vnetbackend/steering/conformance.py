"""What the steering program must report for a frame, by the reference model.

`expected_report` turns the reference model's answer into the `Report` the program
should write; `run_frames` runs frames through a loaded program with BPF_PROG_TEST_RUN
and pairs each return value with the report it wrote. Comparing the two is the
program's conformance check.
"""

from __future__ import annotations

from collections.abc import Iterable

from vnetbackend.rss import HashReport, RssConfig, parse_frame
from vnetbackend.steering.program import SteeringError, SteeringProgram, SteeringState
from vnetbackend.steering.reports import Report
from vnetbackend.steering.testrun import prog_test_run

_EX_REPORTS = frozenset({HashReport.IPV6_EX, HashReport.TCPV6_EX, HashReport.UDPV6_EX})


def expected_report(state: SteeringState, frame: bytes) -> Report:
    """The report (and so the queue) the reference model gives *frame* in *state*."""
    parsed = parse_frame(frame)
    config: RssConfig | None = state.config if state.enabled else None
    if config is None:
        hash_value, report, queue = 0, HashReport.NONE, 0
    else:
        steering = config.steer(frame)
        hash_value, report = steering.hash, steering.report
        queue = steering.queue if state.redirect else config.unclassified_queue
    ports = parsed.ports if parsed.l4_proto else bytes(4)
    return Report(
        queue=queue,
        hash=hash_value,
        report=report,
        ip_version=parsed.ip_version,
        src=parsed.src,
        dst=parsed.dst,
        l4_proto=parsed.l4_proto,
        src_port=int.from_bytes(ports[:2], "big"),
        dst_port=int.from_bytes(ports[2:4], "big"),
        l3_offset=parsed.l3_offset if parsed.ip_version else 0,
        l3_len=parsed.l3_len,
        frame_len=parsed.frame_len,
        has_ext_headers=parsed.has_ext_headers,
        fragment=parsed.fragment,
        hashed_src=parsed.ex_src if report in _EX_REPORTS else parsed.src,
        hashed_dst=parsed.ex_dst if report in _EX_REPORTS else parsed.dst,
    )


def run_frames(program: SteeringProgram, frames: Iterable[bytes]) -> list[tuple[int, Report]]:
    """(return value, report) of one test run per frame, with every frame reported.

    Switches reports to every frame and restarts the counters; reports already in the
    ring are discarded first.
    """
    reader = program.reports()
    program.set_reports(1)
    program.reset_counters()
    reader.drain()
    results = []
    for frame in frames:
        retval = prog_test_run(program.fd, frame).retval
        written = reader.drain()
        if len(written) != 1:
            raise SteeringError(f"{len(written)} reports for one frame {frame.hex()}")
        results.append((retval, written[0]))
    return results
