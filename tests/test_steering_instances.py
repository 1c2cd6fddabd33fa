"""Compile once, load many: an instance loaded from the compiled image is the program.

Each instance must steer and report every frame as the reference model says (the same
check as a freshly compiled program, through BPF_PROG_TEST_RUN), with maps, counters and
report ring of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.prereq import need_bcc
from vnetbackend.rss import HashType, RssConfig
from vnetbackend.rss.vectors import MICROSOFT_KEY
from vnetbackend.steering import SteeringProgram, SteeringState, prog_test_run
from vnetbackend.steering.conformance import expected_report, run_frames
from vnetbackend.steering.instances import MapSpec, ProgramImage, ProgramSource
from vnetbackend.steering.testrun import runnable
from vnetbackend.testbed.traffic import make_batch

GUEST_MAC = bytes.fromhex("525400123456")
FRAMES = [probe.frame for probe in make_batch(GUEST_MAC, per_class=2, seed=7)
          if runnable(probe.frame)]
CONFIG_A = RssConfig(hash_types=HashType(0x1FF), key=MICROSOFT_KEY,
                     indirection_table=[0, 1, 2, 3] * 32, queues=4)
CONFIG_B = RssConfig(hash_types=HashType.IPV4 | HashType.TCPV6,
                     key=bytes(range(100, 140)), indirection_table=[3, 1], queues=4,
                     unclassified_queue=2)


@pytest.fixture(scope="module")
def source() -> Iterator[ProgramSource]:
    need_bcc()
    yield ProgramSource()


def _by_model(program: SteeringProgram, config: RssConfig) -> None:
    """Every frame through *program* under *config*: the model's queue and report."""
    program.apply(config)
    state = SteeringState(True, True, config)
    results = run_frames(program, FRAMES)
    for frame, (queue, report) in zip(FRAMES, results, strict=True):
        expected = expected_report(state, frame)
        assert (queue, report) == (expected.queue, expected), frame.hex()


def test_an_instance_steers_and_reports_as_the_model_and_the_compiled_program(
        source: ProgramSource) -> None:
    assert len(FRAMES) > 20
    with SteeringProgram() as compiled, source.instance() as instance:
        for config in (CONFIG_A, CONFIG_B):
            _by_model(compiled, config)
            _by_model(instance, config)
            compiled_results = run_frames(compiled, FRAMES)
            assert run_frames(instance, FRAMES) == compiled_results


def test_the_image_carries_every_map_of_the_compiled_program(source: ProgramSource) -> None:
    with SteeringProgram() as compiled, source.instance() as instance:
        image = ProgramImage.of(compiled)
        originals = {spec.name: spec for spec in image.maps}
        assert set(compiled.map_fds) <= set(originals)
        assert set(instance.map_fds) == set(originals)
        for name, fd in instance.map_fds.items():
            assert fd not in compiled.map_fds.values()
            assert MapSpec.of_fd(fd) == originals[name]
        assert instance.report_slots == compiled.report_slots


def test_two_instances_keep_their_own_maps_counters_and_reports(
        source: ProgramSource) -> None:
    with source.instance() as first, source.instance() as second:
        assert first.read_state() == second.read_state() == SteeringState(False, False, None)
        first.apply(CONFIG_A)
        second.apply(CONFIG_B, redirect=False)
        first.set_reports(1)
        second.set_reports(3)
        assert first.read_state() == SteeringState(True, True, CONFIG_A)
        assert second.read_state() == SteeringState(True, False, CONFIG_B)
        assert (first.report_every, second.report_every) == (1, 3)
        first_reader, second_reader = first.reports(), second.reports()
        first_reader.drain()
        second_reader.drain()
        first.reset_counters()
        second.reset_counters()
        for frame in FRAMES:
            prog_test_run(first.fd, frame)
        assert first.counters().frames == len(FRAMES)
        assert second.counters().frames == 0
        assert len(first_reader.drain()) == len(FRAMES)
        assert second_reader.drain() == []
        frame = FRAMES[0]
        assert prog_test_run(second.fd, frame).retval == CONFIG_B.unclassified_queue
        assert second.counters().frames == 1 and first.counters().frames == len(FRAMES)
        first.disable()
        assert second.read_state() == SteeringState(True, False, CONFIG_B)


def test_an_instance_outlives_the_image_source_program(source: ProgramSource) -> None:
    """The compiled program is closed once its image is taken; instances still load."""
    source.compile()
    with source.instance() as instance:
        _by_model(instance, CONFIG_A)
