"""The steering program's maps: configuration in and back out, skews, counters, reports."""

from __future__ import annotations

import asyncio
import os
import random
import re
import threading
import time
from collections.abc import Iterator

import pytest

from tests.prereq import need_bcc
from tests.skew import live_slot, skew_indirection_entry, skew_toeplitz_entry
from vnetbackend.bench.samples import sample_frames
from vnetbackend.rss import HashReport, HashType, InvalidRssConfig, RssConfig
from vnetbackend.rss.toeplitz import tables_for
from vnetbackend.rss.vectors import MICROSOFT_KEY
from vnetbackend.steering import (
    MapsInconsistent,
    SteeringProgram,
    SteeringState,
    prog_test_run,
)
from vnetbackend.steering.conformance import expected_report, run_frames
from vnetbackend.steering.layout import MIRRORS
from vnetbackend.steering.program import SOURCE_PATH
from vnetbackend.steering.reports import ReportRingError
from vnetbackend.testbed import frames as f

WAIT_S = 5.0

TCP4 = sample_frames()["ipv4_tcp"]


def _config(**changes: object) -> RssConfig:
    fields: dict[str, object] = {
        "hash_types": HashType(0x1FF), "key": MICROSOFT_KEY,
        "indirection_table": [i % 4 for i in range(64)], "queues": 4, "unclassified_queue": 2,
    }
    fields.update(changes)
    return RssConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def program() -> Iterator[SteeringProgram]:
    need_bcc()
    with SteeringProgram() as loaded:
        yield loaded


def test_every_mirrored_field_is_checked_by_the_c_source() -> None:
    source = SOURCE_PATH.read_text()
    for c_name, mirror in MIRRORS.items():
        assert re.search(rf"^struct {c_name} {{", source, re.M), c_name
        assert f"SAME_SIZE({c_name});" in source
        for field_name, *_ in mirror._fields_:
            assert f"SAME_OFFSET({c_name}, {field_name});" in source, (c_name, field_name)


def test_fresh_program_is_disabled() -> None:
    need_bcc()
    with SteeringProgram() as fresh:
        assert fresh.read_state() == SteeringState(False, False, None)
        assert fresh.read_config() is None
        assert prog_test_run(fresh.fd, TCP4).retval == 0


def test_disable_returns_to_the_fresh_state(program: SteeringProgram) -> None:
    program.apply(_config(unclassified_queue=3), redirect=False)
    assert prog_test_run(program.fd, TCP4).retval == 3
    program.disable()
    assert program.read_state() == SteeringState(False, False, None)
    assert prog_test_run(program.fd, TCP4).retval == 0


def test_apply_and_read_back(program: SteeringProgram) -> None:
    config = _config(key=bytes(range(7)), unclassified_queue=3)
    program.apply(config)
    assert program.read_config() == config
    assert program.read_state() == SteeringState(True, True, config)
    program.apply(config, redirect=False)
    assert program.read_state() == SteeringState(True, False, config)
    assert prog_test_run(program.fd, TCP4).retval == 3


def test_the_kernel_holds_what_apply_wrote_through_the_mapping(
        program: SteeringProgram) -> None:
    # Read through the map's fd (a system call), not the mapping apply writes through;
    # the tables compared with the model's own, built bit by bit from the key.
    key = bytes(range(3, 43))
    config = _config(key=key, indirection_table=[7, 1, 5, 3], queues=8, unclassified_queue=6)
    for delivered in (8, 3):
        program.apply(config, delivered_queues=delivered)
        _, slot = live_slot(program)
        assert (slot.enabled, slot.redirect, slot.hash_types) == (1, 1, 0x1FF)
        assert bytes(slot.key) == key
        assert list(slot.indirection)[:4] == [q % delivered for q in (7, 1, 5, 3)]
        assert slot.unclassified_queue == 6 % delivered
        assert slot.generation == program.generation
        tables = tables_for(key)
        assert [list(row) for row in slot.toeplitz] == [list(tables[i]) for i in range(36)]
    program.disable()
    _, slot = live_slot(program)
    assert (slot.enabled, slot.key_length, bytes(slot.key)) == (0, 0, bytes(40))


def test_invalid_configuration_is_refused_and_the_previous_stays(
        program: SteeringProgram) -> None:
    config = _config()
    program.apply(config)
    with pytest.raises(TypeError, match="RssConfig"):
        program.apply({"hash_types": 1})  # type: ignore[arg-type]
    assert program.read_config() == config
    # An out-of-spec configuration cannot be built, so it never reaches the maps.
    with pytest.raises(InvalidRssConfig, match="indirection_table"):
        _config(indirection_table=[0, 1, 2])
    assert program.read_config() == config
    [(retval, report)] = run_frames(program, [TCP4])
    assert (retval, report) == (config.steer(TCP4).queue, expected_report(
        program.read_state(), TCP4))


def test_a_skewed_indirection_entry_is_seen(program: SteeringProgram) -> None:
    config = _config()
    program.apply(config)
    right = config.steer(TCP4)
    index = right.hash & 63
    wrong_queue = (right.queue + 1) % 4
    skew_indirection_entry(program, index, wrong_queue)
    assert program.read_config() != config
    assert program.read_config().indirection_table[index] == wrong_queue  # type: ignore[union-attr]
    [(retval, report)] = run_frames(program, [TCP4])
    assert retval == report.queue == wrong_queue != right.queue
    assert report.hash == right.hash


def test_a_skewed_toeplitz_entry_is_seen(program: SteeringProgram) -> None:
    config = _config()
    program.apply(config)
    right = config.steer(TCP4)
    first_byte = right.hash_input[0]
    skew_toeplitz_entry(program, 0, first_byte, 0xDEADBEEF)
    with pytest.raises(MapsInconsistent, match=rf"toeplitz\[0\]\[{first_byte}\]"):
        program.read_config()
    [(_, report)] = run_frames(program, [TCP4])
    assert report.report is HashReport.TCPV4
    assert report.hash != right.hash
    program.apply(config)
    assert program.read_config() == config


@pytest.fixture
def one_cpu() -> Iterator[None]:
    """Keep this thread on one CPU: sampling counts per CPU."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    yield
    os.sched_setaffinity(0, allowed)


@pytest.mark.usefixtures("one_cpu")
def test_counters_and_sampling(program: SteeringProgram) -> None:
    program.apply(_config())
    reader = program.reports()
    program.set_reports(0)
    program.reset_counters()
    reader.drain()
    prog_test_run(program.fd, TCP4, repeat=30)
    assert (program.counters().frames, program.counters().reports) == (30, 0)
    assert reader.drain() == []
    program.set_reports(7)
    assert program.report_every == 7
    program.reset_counters()
    prog_test_run(program.fd, TCP4, repeat=30)  # frames 0, 7, 14, 21, 28
    counters = program.counters()
    assert (counters.frames, counters.reports, counters.reports_dropped) == (30, 5, 0)
    assert len(reader.drain()) == 5
    # The countdown left by 1-in-7 must not hold back reports once every frame is wanted.
    program.set_reports(1)
    prog_test_run(program.fd, TCP4, repeat=3)
    assert program.counters().reports == 5 + 3
    assert len(reader.drain()) == 3
    with pytest.raises(ValueError):
        program.set_reports(-1)


def test_a_full_ring_counts_dropped_reports() -> None:
    need_bcc()
    slots = 64
    with SteeringProgram(report_slots=slots) as small:
        small.apply(_config())
        small.set_reports(1)
        reader = small.reports()
        prog_test_run(small.fd, TCP4, repeat=200)  # one test run stays on one CPU
        counters = small.counters()
        assert (counters.frames, counters.reports, counters.reports_dropped) == (
            200, slots, 200 - slots)
        drained = reader.drain()
        assert len(drained) == counters.reports
        assert {r.hash for r in drained} == {_config().steer(TCP4).hash}
        prog_test_run(small.fd, TCP4, repeat=10)
        assert len(reader.drain()) == 10


def test_the_ring_wraps_around() -> None:
    """Reports of every length go round a small ring many times, in order, none lost."""
    need_bcc()
    frames = [f.frame(f.ipv4("10.0.0.1", "10.0.0.2", f.udp(port, 53))) + bytes(port)
              for port in range(1, 8)]
    with SteeringProgram(report_slots=8) as small:
        small.apply(_config())
        small.set_reports(1)
        reader = small.reports()
        for round_ in range(20):
            batch = frames[: 1 + round_ % len(frames)]
            for frame in batch:
                prog_test_run(small.fd, frame)
            assert [r.frame_len for r in reader.drain()] == [len(frame) for frame in batch]
        assert small.counters().reports_dropped == 0


def test_a_reader_outliving_its_program_gets_a_clear_error() -> None:
    need_bcc()
    with SteeringProgram(report_slots=8) as short_lived:
        reader = short_lived.reports()
    with pytest.raises(ReportRingError, match="closed"):
        reader.drain()


def test_report_slots_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        SteeringProgram(report_slots=3)


async def test_reports_arrive_in_the_asyncio_loop(program: SteeringProgram) -> None:
    program.apply(_config())
    program.set_reports(1)
    reader = program.reports()
    reader.drain()
    frames = [f.frame(f.ipv4("10.0.0.1", "10.0.0.2", f.udp(port, 53))) for port in range(5)]
    loop = asyncio.get_running_loop()

    def send_all() -> None:
        for frame in frames:
            prog_test_run(program.fd, frame)

    async def collect() -> list[int]:
        ports = []
        async with asyncio.timeout(5):
            async for report in reader:
                ports.append(report.src_port)
                if len(ports) == len(frames):
                    return ports
        raise AssertionError("unreachable")

    waiting = asyncio.create_task(collect())
    await loop.run_in_executor(None, send_all)
    assert await waiting == list(range(5))
    with pytest.raises(TimeoutError):
        await reader.next(timeout=0.05)


async def test_no_report_is_left_unannounced(program: SteeringProgram) -> None:
    """Ping-pong across CPUs: a thread (on another CPU when there is one) writes one report
    as the reader goes to sleep on the bell; every report must wake it. A lost wake-up
    shows as a timeout."""
    program.apply(_config())
    program.set_reports(1)
    reader = program.reports()
    reader.drain()
    rounds = 3000
    frames = [f.frame(f.ipv4("10.0.0.1", "10.0.0.2", f.udp(port, 53))) for port in (1, 2)]
    loop = asyncio.get_running_loop()
    turn = threading.Semaphore(0)
    cpus = sorted(os.sched_getaffinity(0))

    def writer() -> None:
        os.sched_setaffinity(0, {cpus[-1]})  # this thread only
        spread = random.Random(7)
        for n in range(rounds):
            if not turn.acquire(timeout=WAIT_S):
                return
            # Land at different points of the reader's scan, from before it to after it.
            until = time.perf_counter() + spread.uniform(0, 60e-6)
            while time.perf_counter() < until:
                pass
            prog_test_run(program.fd, frames[n % 2])

    os.sched_setaffinity(0, {cpus[0]})
    try:
        writing = loop.run_in_executor(None, writer)
        for n in range(rounds):
            turn.release()
            report = await reader.next(timeout=WAIT_S)
            assert report.src_port == 1 + n % 2, n
        await writing
    finally:
        os.sched_setaffinity(0, set(cpus))
