"""The kernel against the specification, on every report, without the frame.

A steering report carries the hash input as the program used it (IP version, transport,
extension headers, addresses, the `_EX` addresses it took, ports) and the generation of
the configuration that steered the frame. `KernelCheck.judge` takes a batch of report
records straight from the rings (`ReportRings.take_batch`), looks up each generation's
configuration (`SteeringProgram.generation_of`) and has the reference model over arrays
(`vnetbackend.rss.batch`) recompute hash, report type and queue for every record; a
report whose three differ from the model's is a disagreement. So frames in flight across
a configuration change are judged by the configuration that steered them. What is judged
is the program's arithmetic and decisions given its own reading of the frame; the
reading itself is the conformance tests' business (they have the frames).

Disagreements are also tallied per flow (``flows``: the report's addresses, transport and
ports), for the first `MAX_FLOWS` flows that disagree; later ones are counted in
``flows-overflow``. Agreeing reports are tallied per class only: keeping every flow of
a live tap would cost a sort per batch.

Reports of a generation no longer kept are counted as ``unjudged``, not guessed at.
Each disagreement is a ``VNET_HASH_MISMATCH`` event (``source: kernel``) with the
report, the configuration and the model's answer, at most `EVENTS_PER_BATCH` per batch
(the rest are counted in ``events-suppressed``), so a broken map cannot flood the
monitor's clients.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vnetbackend.rss import HashReport, rss_view
from vnetbackend.rss.batch import KINDS, Answers, BatchModel, Flows, kind_codes
from vnetbackend.steering.layout import (
    REPORT_FLAG_EX_DST,
    REPORT_FLAG_EX_SRC,
    REPORT_FLAG_EXT_HEADERS,
    REPORT_FLAG_FRAGMENT,
    SteeringReport,
)
from vnetbackend.steering.program import Generation
from vnetbackend.steering.reports import RECORD_DTYPE, Report

EventSink = Callable[[str, dict[str, Any]], None]
GenerationLookup = Callable[[int], Generation | None]
EVENTS_PER_BATCH = 16
MAX_FLOWS = 256
#: Classes: a flow kind (`vnetbackend.rss.batch.KINDS`), twice: not a fragment, fragment.
CLASSES = 2 * KINDS
_PORT_BYTES = [RECORD_DTYPE.fields[name][1] + byte
               for name in ("src_port", "dst_port") for byte in (1, 0)]  # little-endian host


def class_name(code: int) -> str:
    """The frame class of class *code*, e.g. ``ipv4_tcp``, ``ipv6_ext_udp``,
    ``ipv4_fragment``, ``ipv6_other`` (IP with no transport header that counts),
    ``non_ip``."""
    fragment, kind = divmod(code, KINDS)
    ip, rest = divmod(kind, 6)
    l4, ext = divmod(rest, 2)
    if ip == 0:
        return "non_ip"
    name = ("ipv4", "ipv6")[ip - 1] + ("_ext" if ext else "")
    if fragment:
        return name + "_fragment"
    return name + ("_other", "_tcp", "_udp")[l4]


def flows_of(batch: np.ndarray) -> Flows:
    """The flows of a batch of report records (views where numpy allows)."""
    flags = batch["flags"]
    raw = batch.view(np.uint8).reshape(len(batch), RECORD_DTYPE.itemsize)
    return Flows(ip_version=batch["ip_version"], l4_proto=batch["l4_proto"],
                 ext=(flags & REPORT_FLAG_EXT_HEADERS) != 0, src=batch["src"],
                 dst=batch["dst"], ex_src=batch["ex_src"], ex_dst=batch["ex_dst"],
                 has_ex_src=(flags & REPORT_FLAG_EX_SRC) != 0,
                 has_ex_dst=(flags & REPORT_FLAG_EX_DST) != 0, ports=raw[:, _PORT_BYTES])


def class_codes(batch: np.ndarray) -> np.ndarray:
    """Each record's frame class (see `class_name`)."""
    flags = batch["flags"]
    kinds = kind_codes(batch["ip_version"], batch["l4_proto"],
                       (flags & REPORT_FLAG_EXT_HEADERS) != 0)
    return kinds + KINDS * ((flags & REPORT_FLAG_FRAGMENT) != 0)


@dataclass
class KernelTally:
    reports: int = 0
    agreed: int = 0
    disagreed: int = 0
    unjudged: int = 0


@dataclass
class KernelCheck:
    """Judges report records batch by batch and keeps the tallies (per frame class)."""

    generation_of: GenerationLookup
    publish: EventSink | None = None
    _models: dict[int, BatchModel] = field(default_factory=dict)
    _reports: np.ndarray = field(default_factory=lambda: np.zeros(CLASSES, np.int64))
    _disagreed: np.ndarray = field(default_factory=lambda: np.zeros(CLASSES, np.int64))
    _unjudged: np.ndarray = field(default_factory=lambda: np.zeros(CLASSES, np.int64))
    events_suppressed: int = 0
    flows: dict[str, int] = field(default_factory=dict)
    flows_overflow: int = 0

    def reset(self) -> None:
        """Forget the tallies (the models stay)."""
        for counts in (self._reports, self._disagreed, self._unjudged):
            counts[:] = 0
        self.events_suppressed = 0
        self.flows.clear()
        self.flows_overflow = 0

    def _model(self, number: int) -> BatchModel | None:
        model = self._models.get(number)
        if model is None:
            generation = self.generation_of(number)
            if generation is None:
                return None
            state = generation.state
            model = BatchModel(state.config if state.enabled else None, state.redirect,
                               generation.delivered_queues)
            if len(self._models) >= 64:
                self._models.pop(next(iter(self._models)))
            self._models[number] = model
        return model

    def judge(self, batch: np.ndarray) -> np.ndarray:
        """Judge every record of *batch* (`RECORD_DTYPE`); returns the disagreeing
        records' indices."""
        if not len(batch):
            return np.empty(0, np.intp)
        classes = class_codes(batch)
        self._reports += np.bincount(classes, minlength=CLASSES)
        generations = batch["generation"]
        first = generations[0]
        groups = ([first] if (generations == first).all()
                  else np.unique(generations).tolist())
        disagreeing = []
        for number in groups:
            rows = None if len(groups) == 1 else np.flatnonzero(generations == number)
            part = batch if rows is None else batch[rows]
            model = self._model(int(number))
            if model is None:
                self._unjudged += np.bincount(
                    classes if rows is None else classes[rows], minlength=CLASSES)
                continue
            answers = model.answer(flows_of(part))
            wrong = np.flatnonzero((answers.hash != part["hash"])
                                   | (answers.report != part["report_type"])
                                   | (answers.queue != part["queue"]))
            if len(wrong):
                self._publish(model, int(number), part, answers, wrong)
                disagreeing.append(wrong if rows is None else rows[wrong])
        found = np.concatenate(disagreeing) if disagreeing else np.empty(0, np.intp)
        self._disagreed += np.bincount(classes[found], minlength=CLASSES)
        for row in found.tolist():
            self._count_flow(batch[row])
        return found

    def _count_flow(self, record: np.void) -> None:
        key = flow_name(record)
        if key in self.flows:
            self.flows[key] += 1
        elif len(self.flows) < MAX_FLOWS:
            self.flows[key] = 1
        else:
            self.flows_overflow += 1

    def _publish(self, model: BatchModel, number: int, part: np.ndarray, answers: Answers,
                 wrong: np.ndarray) -> None:
        shown = wrong[:EVENTS_PER_BATCH]
        self.events_suppressed += len(wrong) - len(shown)
        if self.publish is None:
            return
        generation = self.generation_of(number)
        for row in shown.tolist():
            record = part[row].tobytes()
            try:
                seen: dict[str, Any] = report_view(
                    Report.from_record(SteeringReport.from_buffer_copy(record)))
            except ValueError:  # a report type the specification does not have
                seen = {"report-type": int(part[row]["report_type"]), "record": record.hex()}
            self.publish("VNET_HASH_MISMATCH", {
                "source": "kernel",
                "frame-class": class_name(int(class_codes(part[row:row + 1])[0])),
                "generation": number,
                "report": seen,
                "config": rss_view(model.config),
                "redirect": bool(generation and generation.state.redirect),
                "delivered-queues": generation.delivered_queues if generation else None,
                "specification": {
                    "hash": f"0x{int(answers.hash[row]):08x}",
                    "report-type": HashReport(int(answers.report[row])).virtio_name,
                    "queue": int(answers.queue[row]),
                },
            })

    def summary(self) -> dict[str, Any]:
        """Totals and per-class tallies since the start (or the last `reset`)."""
        classes: dict[str, KernelTally] = {}
        for code in np.flatnonzero(self._reports).tolist():
            tally = classes.setdefault(class_name(code), KernelTally())
            tally.reports += int(self._reports[code])
            tally.disagreed += int(self._disagreed[code])
            tally.unjudged += int(self._unjudged[code])
        for tally in classes.values():
            tally.agreed = tally.reports - tally.disagreed - tally.unjudged
        totals = KernelTally()
        for tally in classes.values():
            for name in vars(totals):
                setattr(totals, name, getattr(totals, name) + getattr(tally, name))
        return {**vars(totals), "events-suppressed": self.events_suppressed,
                "classes": {name: vars(tally) for name, tally in sorted(classes.items())},
                "flows": {"disagreed": dict(self.flows), "flows-overflow": self.flows_overflow}}


def flow_name(record: np.void) -> str:
    """A report's flow, e.g. ``tcp 10.0.0.1:80 > 10.0.0.2:1234`` (``non_ip`` without
    addresses; no ports where the transport header did not count)."""
    version = int(record["ip_version"])
    if version not in (4, 6):
        return "non_ip"
    width = 4 if version == 4 else 16
    src = ipaddress.ip_address(bytes(record["src"][:width]))
    dst = ipaddress.ip_address(bytes(record["dst"][:width]))
    proto = {6: "tcp", 17: "udp"}.get(int(record["l4_proto"]))
    if proto is None:
        return f"ipv{version} {src} > {dst}"
    return f"{proto} {src}:{int(record['src_port'])} > {dst}:{int(record['dst_port'])}"


def report_view(report: Report) -> dict[str, Any]:
    """A report as JSON-ready values, for events."""
    return {
        "hash": f"0x{report.hash:08x}", "report-type": report.report.virtio_name,
        "queue": report.queue, "ip-version": report.ip_version, "l4-proto": report.l4_proto,
        "src": report.src.hex(), "dst": report.dst.hex(),
        "hashed-src": report.hashed_src.hex(), "hashed-dst": report.hashed_dst.hex(),
        "src-port": report.src_port, "dst-port": report.dst_port,
        "ext-headers": report.has_ext_headers, "fragment": report.fragment,
        "frame-len": report.frame_len, "generation": report.generation,
    }
