"""Cost of the steering program per frame under BPF_PROG_TEST_RUN, beside two yardsticks.

Each figure is the median, over --rounds rounds, of the mean run time per frame over
--repeat runs of one frame, as the kernel measures it. A round times the empty program
and then every figure of one case back to back, and each ratio is the median of the
rounds' own ratios, so that a machine whose speed drifts during the run (a shared host
does) moves both sides of a ratio alike. The whole run stays on one CPU (``cpu``): a
test run executes on the CPU that asks for it, and its caches are part of the cost.

* ``ns``: reports off.
* ``ns_reports``: a report for every frame into the program's default report rings, which
  are emptied every `chunk` runs, the way a reader that keeps up sees it: every report
  is really written, none dropped (the first report after each emptying also rings the
  reader's bell).
* ``ns_reports_unread``: a report for every frame, all --repeat runs at once into rings
  large enough to hold them, with nobody reading (the rings' memory is cold).
* ``ns_bitwise``: the same program built to hash bit by bit the way QEMU does (for each
  set input bit, XOR in the key's 32-bit window at that bit), reports off.

Ratios are to the empty program (``ratio*``, and ``bitwise_ratio`` for the yardstick
itself) and to the bit-by-bit build (``*_to_bitwise``); each case gives the median empty
program of its rounds (``empty_ns``), the top level that of all rounds.
``reports_dropped`` counts reports that found their ring full anyway (0 means all were
timed writes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vnetbackend.bench.samples import sample_frames
from vnetbackend.rss import ALL_HASH_TYPES, RssConfig
from vnetbackend.rss.vectors import MICROSOFT_KEY
from vnetbackend.steering import SteeringProgram, prog_test_run
from vnetbackend.steering.program import DEFAULT_REPORT_SLOTS, SOURCE_PATH

EMPTY_PROGRAM = b"int empty(struct __sk_buff *skb) { return 0; }"
#: (case, figure) -> the most it may be, as a multiple of the empty program.
TARGETS = {
    ("ipv4_tcp", "ratio"): 2.5,
    ("ipv4_tcp", "ratio_reports"): 3.0,
    ("ipv6_ext", "ratio_reports"): 4.0,
    ("non_ip", "ratio"): 1.6,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=int, default=100_000,
                        help="runs per timing (default: %(default)s, at least 100000)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timings per figure; the median is reported (default: %(default)s)")


@contextlib.contextmanager
def bitwise_program() -> Iterator[SteeringProgram]:
    """The steering program built with TOEPLITZ_BITWISE: it hashes bit by bit from the key."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / SOURCE_PATH.name
        source.write_text("#define TOEPLITZ_BITWISE\n" + SOURCE_PATH.read_text())
        with SteeringProgram(source=source) as program:
            yield program


def _slots_for(records: int) -> int:
    """Report slots per CPU (a power of two) for *records* reports."""
    slots = 1
    while slots < records:
        slots *= 2
    return slots


class _Timer:
    def __init__(self, repeat: int) -> None:
        self.repeat = repeat

    def plain(self, fd: int, frame: bytes) -> float:
        return float(prog_test_run(fd, frame, self.repeat).duration_ns)

    def drained(self, program: SteeringProgram, frame: bytes, chunk: int) -> float:
        """Mean over `repeat` runs made in chunks, the ring emptied after each chunk."""
        reader = program.reports()
        total, done = 0, 0
        while done < self.repeat:
            runs = min(chunk, self.repeat - done)
            total += prog_test_run(program.fd, frame, runs).duration_ns * runs
            reader.discard()
            done += runs
        return total / self.repeat

    def unread(self, program: SteeringProgram, frame: bytes) -> float:
        duration = self.plain(program.fd, frame)
        program.reports().discard()
        return duration


@dataclass(frozen=True, slots=True)
class _Round:
    """One round of one case, in ns per frame."""

    empty: float
    plain: float
    bitwise: float
    drained: float
    unread: float


def _figures(rounds: list[_Round]) -> dict[str, float]:
    """A case's figures: medians of the rounds' times and of the rounds' own ratios."""
    def median(value: Callable[[_Round], float], digits: int = 1) -> float:
        return round(statistics.median(value(r) for r in rounds), digits)

    return {
        "empty_ns": median(lambda r: r.empty),
        "ns": median(lambda r: r.plain), "ns_reports": median(lambda r: r.drained),
        "ns_reports_unread": median(lambda r: r.unread),
        "ns_bitwise": median(lambda r: r.bitwise),
        "ratio": median(lambda r: r.plain / r.empty, 2),
        "ratio_reports": median(lambda r: r.drained / r.empty, 2),
        "ratio_reports_unread": median(lambda r: r.unread / r.empty, 2),
        "bitwise_ratio": median(lambda r: r.bitwise / r.empty, 2),
        "ratio_to_bitwise": median(lambda r: r.plain / r.bitwise, 2),
        "ratio_reports_to_bitwise": median(lambda r: r.drained / r.bitwise, 2),
    }


@contextlib.contextmanager
def _on_one_cpu() -> Iterator[int]:
    """Run the block on one of the CPUs this process may use (the highest numbered)."""
    allowed = os.sched_getaffinity(0)
    cpu = max(allowed)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, allowed)


def run(args: argparse.Namespace) -> dict[str, object]:
    if args.repeat < 100_000:
        raise SystemExit("vnetbackend bench steering: --repeat must be at least 100000")
    from bcc import BPF

    frames = sample_frames()
    config = RssConfig(hash_types=ALL_HASH_TYPES, key=MICROSOFT_KEY,
                       indirection_table=range(128), queues=128)
    timer = _Timer(args.repeat)
    chunk = DEFAULT_REPORT_SLOTS // 2
    empty = BPF(text=EMPTY_PROGRAM)
    empty_fd = empty.load_func(b"empty", BPF.SOCKET_FILTER).fd
    cases: dict[str, dict[str, float]] = {}
    empties: list[float] = []
    written = dropped = 0
    with _on_one_cpu() as cpu, SteeringProgram() as program, \
            SteeringProgram(report_slots=_slots_for(args.repeat)) as big_ring, \
            bitwise_program() as bitwise:
        for loaded in (program, big_ring, bitwise):
            loaded.apply(config)
            loaded.reset_counters()
        big_ring.set_reports(1)
        for name, frame in frames.items():
            rounds = []
            for _ in range(args.rounds):
                program.set_reports(0)
                empty_time = timer.plain(empty_fd, frames["ipv4_tcp"])
                plain = timer.plain(program.fd, frame)
                by_bits = timer.plain(bitwise.fd, frame)
                program.set_reports(1)
                drained = timer.drained(program, frame, chunk)
                rounds.append(_Round(empty_time, plain, by_bits, drained,
                                     timer.unread(big_ring, frame)))
            empties += [r.empty for r in rounds]
            cases[name] = _figures(rounds)
        for loaded in (program, big_ring):
            written += loaded.counters().reports
            dropped += loaded.counters().reports_dropped
    empty.cleanup()
    empty_ns = round(statistics.median(empties), 1)
    missed = [f"{name}.{figure}" for (name, figure), limit in TARGETS.items()
              if cases[name][figure] > limit]
    return {
        "benchmark": "steering",
        "cpu": cpu,
        "empty_ns": empty_ns,
        "cases": cases,
        "repeat": args.repeat,
        "rounds": args.rounds,
        "report_slots": DEFAULT_REPORT_SLOTS,
        "drain_every": chunk,
        "unread_report_slots": _slots_for(args.repeat),
        "reports_written": written,
        "reports_dropped": dropped,
        "targets": {f"{name}.{figure}": limit for (name, figure), limit in TARGETS.items()},
        "targets_met": not missed,
        "targets_missed": missed,
    }
