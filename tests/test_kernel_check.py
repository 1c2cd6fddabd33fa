"""The kernel against the specification on every report: the batch model, the live check.

The batch model's answers are held against the scalar model (`RssConfig.steer_parsed`)
and the Toeplitz oracle of tests/oracle.py on random flows; the live check against a
real program run with BPF_PROG_TEST_RUN, whose maps are skewed (tests/skew.py) or
switched between configurations, with the expectation of every report worked out from
the frame by the scalar model.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest

from tests.oracle import toeplitz_oracle
from tests.prereq import need_bcc
from tests.skew import skew_indirection_entry, skew_toeplitz_entry
from vnetbackend.bench.checker import mixed_frames
from vnetbackend.kernel_check import KernelCheck, class_codes, class_name
from vnetbackend.rss import ALL_HASH_TYPES, HashReport, ParsedFrame, RssConfig
from vnetbackend.rss.batch import BatchModel, Flows
from vnetbackend.rss.vectors import MICROSOFT_KEY
from vnetbackend.steering import SteeringProgram, prog_test_run
from vnetbackend.steering.program import Generation, SteeringState
from vnetbackend.steering.testrun import runnable

CONFIG_A = RssConfig(hash_types=ALL_HASH_TYPES, key=MICROSOFT_KEY,
                     indirection_table=[q % 4 for q in range(128)], queues=4)
CONFIG_B = RssConfig(hash_types=0x3F, key=bytes(range(7, 47)),
                     indirection_table=[(q * 3) % 4 for q in range(64)], queues=4,
                     unclassified_queue=2)
FRAMES = [frame for frame in mixed_frames(160, seed=5) if runnable(frame)]


def _random_flow(rng: random.Random) -> tuple[ParsedFrame, bytes, bytes, bool, bool]:
    """A parsed flow, and its home and routed addresses and whether it has them."""
    version = rng.choice((0, 4, 6, 6))
    width = {4: 4, 6: 16}.get(version, 0)
    src, dst = rng.randbytes(width), rng.randbytes(width)
    home, routed = rng.randbytes(16), rng.randbytes(16)
    ext = version == 6 and rng.random() < 0.5
    has_home = ext and rng.random() < 0.5
    has_routed = ext and rng.random() < 0.5
    proto = rng.choice((0, 6, 17)) if version else 0
    ports = rng.randbytes(4) if proto else b""
    parsed = ParsedFrame(version, 14, src, dst, home if has_home else src,
                         routed if has_routed else dst, ext, False, proto, ports, 200)
    return parsed, home, routed, has_home, has_routed


def _flows(items: list[tuple[ParsedFrame, bytes, bytes, bool, bool]]) -> Flows:
    def block(values: list[bytes], width: int) -> np.ndarray:
        return np.array([list(v.ljust(width, b"\0")) for v in values], np.uint8).reshape(
            len(values), width)

    parsed = [item[0] for item in items]
    return Flows(
        ip_version=np.array([p.ip_version for p in parsed], np.uint8),
        l4_proto=np.array([p.l4_proto for p in parsed], np.uint8),
        ext=np.array([p.has_ext_headers for p in parsed], bool),
        src=block([p.src for p in parsed], 16), dst=block([p.dst for p in parsed], 16),
        ex_src=block([item[1] for item in items], 16),
        ex_dst=block([item[2] for item in items], 16),
        has_ex_src=np.array([item[3] for item in items], bool),
        has_ex_dst=np.array([item[4] for item in items], bool),
        ports=block([p.ports for p in parsed], 4))


@pytest.mark.parametrize("seed", range(12))
def test_the_batch_model_answers_as_the_scalar_model_and_the_oracle(seed: int) -> None:
    rng = random.Random(seed)
    queues = rng.randint(1, 16)
    config = RssConfig(hash_types=rng.randrange(0x200), key=rng.randbytes(rng.randint(1, 40)),
                       indirection_table=[rng.randrange(queues) for _ in range(
                           1 << rng.randint(0, 7))],
                       queues=queues, unclassified_queue=rng.randrange(queues))
    delivered = rng.choice((None, rng.randint(1, queues)))
    redirect = rng.random() < 0.8
    items = [_random_flow(rng) for _ in range(400)]
    answers = BatchModel(config, redirect, delivered).answer(_flows(items))
    modulo = delivered or queues
    for index, (parsed, *_) in enumerate(items):
        steering = config.steer_parsed(parsed)
        assert steering.hash == toeplitz_oracle(config.key, steering.hash_input)
        queue = steering.queue if redirect else config.unclassified_queue
        assert (int(answers.hash[index]), HashReport(int(answers.report[index])),
                int(answers.queue[index])) == (steering.hash, steering.report,
                                               queue % modulo), (seed, index, parsed)


def test_rss_off_answers_no_hash_and_queue_0() -> None:
    items = [_random_flow(random.Random(1)) for _ in range(50)]
    answers = BatchModel(None).answer(_flows(items))
    assert not answers.hash.any() and not answers.report.any() and not answers.queue.any()


def test_class_names_are_distinct_and_readable() -> None:
    names = {class_name(code) for code in range(36)}
    assert {"ipv4_tcp", "ipv6_ext_udp", "ipv4_fragment", "ipv6_other", "non_ip"} <= names


@pytest.fixture(scope="module")
def program() -> Iterator[SteeringProgram]:
    need_bcc()
    with SteeringProgram(report_slots=1024) as loaded:
        yield loaded


def _run(program: SteeringProgram, frames: list[bytes]) -> list[int]:
    return [prog_test_run(program.fd, frame).retval for frame in frames]


def _fresh(program: SteeringProgram, config: RssConfig, **kw: object) -> None:
    program.apply(config, **kw)  # type: ignore[arg-type]
    program.set_reports(1)
    program.report_rings().take_batch()


def test_every_report_of_a_sound_program_agrees_and_names_its_class(
        program: SteeringProgram) -> None:
    _fresh(program, CONFIG_A)
    _run(program, FRAMES)
    batch = program.report_rings().take_batch()
    check = KernelCheck(program.generation_of)
    assert len(batch) == len(FRAMES)
    assert (batch["generation"] == program.generation).all()
    assert len(check.judge(batch)) == 0
    summary = check.summary()
    assert (summary["reports"], summary["agreed"], summary["disagreed"]) == (
        len(FRAMES), len(FRAMES), 0)
    assert {"ipv4_tcp", "ipv4_udp", "ipv4_fragment", "ipv6_ext_tcp", "ipv6_ext_udp",
            "non_ip"} <= set(summary["classes"])


def test_a_skewed_indirection_entry_is_caught_report_by_report(
        program: SteeringProgram) -> None:
    _fresh(program, CONFIG_A)
    entry = 5
    skew_indirection_entry(program, entry, (CONFIG_A.indirection_table[entry] + 1) % 4)
    _run(program, FRAMES)
    batch = program.report_rings().take_batch()
    events: list[dict[str, object]] = []
    found = KernelCheck(program.generation_of, lambda _name, data: events.append(data)
                        ).judge(batch)
    expected = [index for index, frame in enumerate(FRAMES)
                if (s := CONFIG_A.steer(frame)).report is not HashReport.NONE
                and s.hash & 127 == entry]
    assert expected, "the frames must reach the skewed entry"
    assert sorted(found.tolist()) == expected
    assert len(events) == min(len(expected), 16)
    check = KernelCheck(program.generation_of)
    check.judge(batch)
    named = check.summary()["flows"]["disagreed"]
    assert sum(named.values()) == len(expected)
    assert all(name.startswith(("tcp ", "udp ", "ipv4 ", "ipv6 ")) for name in named)
    assert events[0]["source"] == "kernel"
    assert events[0]["specification"]["queue"] == CONFIG_A.indirection_table[entry]  # type: ignore[index]


def test_a_skewed_toeplitz_entry_is_caught_report_by_report(
        program: SteeringProgram) -> None:
    _fresh(program, CONFIG_A)
    steered = [CONFIG_A.steer(frame) for frame in FRAMES]
    position, byte = 9, next(s.hash_input[9] for s in steered if len(s.hash_input) > 9)
    skew_toeplitz_entry(program, position, byte, 0xDEADBEEF)
    _run(program, FRAMES)
    found = KernelCheck(program.generation_of).judge(program.report_rings().take_batch())
    expected = [index for index, s in enumerate(steered)
                if len(s.hash_input) > position and s.hash_input[position] == byte]
    assert sorted(found.tolist()) == expected


def test_reports_across_a_switch_are_judged_by_their_own_generation(
        program: SteeringProgram) -> None:
    _fresh(program, CONFIG_A)
    before = program.generation
    _run(program, FRAMES)
    program.apply(CONFIG_B)
    _run(program, FRAMES)
    batch = program.report_rings().take_batch()
    assert batch["generation"].tolist() == [before] * len(FRAMES) + [before + 1] * len(FRAMES)
    assert [int(q) for q in batch["queue"]] == [CONFIG_A.steer(fr).queue for fr in FRAMES] + [
        CONFIG_B.steer(fr).queue for fr in FRAMES]
    assert len(KernelCheck(program.generation_of).judge(batch)) == 0
    # Judged by the wrong generation, the first half would not pass.
    only_b = program.generation_of(before + 1)
    wrong = KernelCheck(lambda _number: only_b).judge(batch)
    assert len(wrong) > 0 and max(wrong) < len(FRAMES)


def test_reports_of_a_forgotten_generation_are_unjudged(program: SteeringProgram) -> None:
    _fresh(program, CONFIG_A)
    _run(program, FRAMES[:10])
    check = KernelCheck(lambda _number: None)
    assert len(check.judge(program.report_rings().take_batch())) == 0
    summary = check.summary()
    assert (summary["reports"], summary["unjudged"], summary["agreed"]) == (10, 10, 0)


def test_queues_are_the_ones_the_tap_delivers(program: SteeringProgram) -> None:
    wide = RssConfig(hash_types=ALL_HASH_TYPES, key=MICROSOFT_KEY,
                     indirection_table=[q % 8 for q in range(128)], queues=8,
                     unclassified_queue=7)
    _fresh(program, wide, delivered_queues=3)
    returned = _run(program, FRAMES)
    assert returned == [wide.steer(frame).queue % 3 for frame in FRAMES]
    batch = program.report_rings().take_batch()
    assert batch["queue"].tolist() == returned
    generation = program.generation_of(program.generation)
    assert generation == Generation(program.generation, SteeringState(True, True, wide), 3)
    assert len(KernelCheck(program.generation_of).judge(batch)) == 0


def test_batches_come_whole_and_in_order_when_the_ring_wraps() -> None:
    need_bcc()
    with SteeringProgram(report_slots=8) as small:
        small.apply(CONFIG_A)
        small.set_reports(1)
        rings = small.report_rings()
        frames = FRAMES[:6]
        hashes = [CONFIG_A.steer(frame).hash for frame in frames]
        for _ in range(3):  # 18 records through 8 slots
            _run(small, frames)
            batch = rings.take_batch()
            assert batch["hash"].tolist() == hashes
        _run(small, FRAMES[:12])  # 4 more than the ring holds: those are dropped
        assert len(rings.take_batch()) == 8
        assert small.counters().reports_dropped == 4
        assert class_codes(rings.take_batch()).size == 0


def test_a_record_of_an_unknown_report_type_is_a_disagreement_not_a_fault(
        program: SteeringProgram) -> None:
    _fresh(program, CONFIG_A)
    _run(program, FRAMES[:4])
    batch = program.report_rings().take_batch()
    batch["report_type"][1] = 12  # no such report type
    events: list[dict[str, object]] = []
    found = KernelCheck(program.generation_of, lambda _n, data: events.append(data)).judge(
        batch)
    assert found.tolist() == [1]
    assert events[0]["report"]["report-type"] == 12  # type: ignore[index]
