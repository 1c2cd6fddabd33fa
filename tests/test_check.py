"""The three-way check on constructed answers: every outcome and every count."""

from __future__ import annotations

import dataclasses
from typing import Any

from vnetbackend.checker import HashChecker, Outcome, expectation
from vnetbackend.qemu.departures import AUTH_HEADER_LENGTH
from vnetbackend.rss import RssConfig
from vnetbackend.rss.vectors import MICROSOFT_KEY
from vnetbackend.steering.conformance import expected_report
from vnetbackend.steering.program import SteeringState
from vnetbackend.testbed.observer import RxRecord
from vnetbackend.testbed.traffic import make_batch
from vnetbackend.testbed.vm import GUEST_MAC_BYTES

CONFIG = RssConfig(hash_types=0x3F, key=MICROSOFT_KEY, indirection_table=[0, 1, 2, 3] * 4,
                   queues=4)


def batch(classes: list[str] | None = None) -> list[tuple[str, bytes]]:
    probes = make_batch(GUEST_MAC_BYTES, per_class=1, seed=3, classes=classes)
    return [(p.frame_class, p.frame) for p in probes]


def kernel_answers(frames: list[tuple[str, bytes]]) -> list[Any]:
    state = SteeringState(True, True, CONFIG)
    return [expected_report(state, frame) for _, frame in frames]


def guest_answers(frames: list[tuple[str, bytes]]) -> list[RxRecord]:
    return [RxRecord.of(frame, expectation(CONFIG, frame)) for _, frame in frames]


def test_agreement_and_documented_departures_are_told_apart() -> None:
    frames = batch()
    events: list[tuple[str, dict[str, Any]]] = []
    checker = HashChecker(lambda name, data: events.append((name, data)))
    verdicts = checker.check(CONFIG, frames, kernel_answers(frames), guest_answers(frames))
    outcomes = {v.frame_class: v.outcome for v in verdicts}
    assert outcomes["ipv4_tcp"] is Outcome.AGREED
    assert outcomes["ipv6_auth_header_tcp"] is Outcome.DEPARTURE
    assert outcomes["ipv6_atomic_fragment_udp"] is Outcome.SPEC_OPEN
    summary = checker.summary()
    assert summary["frames"] == len(frames) and summary["disagreed"] == 0 and not events
    assert summary["agreed"] + summary["departures"] + summary["spec_open"] == len(frames)
    assert summary["classes"]["ipv6_auth_header_tcp"]["departures"] >= 1
    assert summary["classes"]["ipv6_atomic_fragment_udp"]["spec_open"] >= 1


def test_a_wrong_kernel_hash_is_a_mismatch_event_with_three_answers() -> None:
    frames = batch(["ipv4_udp", "ipv6_tcp"])
    kernel = kernel_answers(frames)
    kernel[1] = dataclasses.replace(kernel[1], hash=kernel[1].hash ^ 1)
    events: list[tuple[str, dict[str, Any]]] = []
    checker = HashChecker(lambda name, data: events.append((name, data)))
    checker.check(CONFIG, frames, kernel, guest_answers(frames))
    assert [name for name, _ in events] == ["VNET_HASH_MISMATCH"]
    data = events[0][1]
    assert data["frame"] == frames[1][1].hex() and data["frame-class"] == "ipv6_tcp"
    assert data["kernel"]["hash"] != data["specification"]["hash"] == data["guest"]["hash"]
    assert data["config"]["key"] == MICROSOFT_KEY.hex()
    assert "kernel differs" in data["reason"]
    assert checker.summary()["disagreed"] == 1


def test_a_guest_that_differs_is_a_mismatch() -> None:
    frames = batch(["ipv4_tcp"])
    guest = guest_answers(frames)
    guest[0] = dataclasses.replace(guest[0], queue=(guest[0].queue + 1) % 4)
    checker = HashChecker()
    (verdict,) = checker.check(CONFIG, frames, kernel_answers(frames), guest)
    assert verdict.outcome is Outcome.DISAGREED and "guest differs" in verdict.reason


def test_a_departure_the_guest_does_not_follow_is_a_mismatch() -> None:
    frames = [f for f in batch() if AUTH_HEADER_LENGTH.recognises(CONFIG, f[1])][:1]
    guest = guest_answers(frames)
    model = CONFIG.steer(frames[0][1])
    guest[0] = dataclasses.replace(guest[0], hash=model.hash, l4_hash=True)
    (verdict,) = HashChecker().check(CONFIG, frames, kernel_answers(frames), guest)
    assert verdict.outcome is Outcome.DISAGREED
    assert "documented departure ipv6-ah-length" in verdict.reason


def test_nothing_unmatched_is_dropped() -> None:
    frames = batch(["ipv4_tcp", "ipv6_udp", "arp"])
    kernel = kernel_answers(frames)
    guest = guest_answers(frames)
    stray_report = dataclasses.replace(kernel[0], frame_len=9999)
    stray_record = dataclasses.replace(guest[0], l3_len=9999)
    checker = HashChecker()
    verdicts = checker.check(CONFIG, frames, [kernel[0], kernel[2], stray_report],
                             [guest[0], guest[1], guest[2], guest[2], stray_record])
    assert [v.outcome for v in verdicts] == [Outcome.AGREED, Outcome.UNMATCHED,
                                             Outcome.UNMATCHED]
    summary = checker.summary()
    assert (summary["unmatched"], summary["unmatched-reports"],
            summary["unmatched-guest-records"]) == (2, 1, 1)
