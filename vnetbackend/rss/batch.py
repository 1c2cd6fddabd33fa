"""The reference model over arrays: hash, report type and queue for many flows at once.

`RssConfig.steer` answers one frame at a time in Python; `BatchModel` answers a batch of
already parsed flows (what a steering report carries: IP version, transport, whether
there are extension headers, addresses, ports) with numpy, for checking every report of
a live tap. It decides nothing itself that the scalar model decides: which report type a
kind of flow gets under the configuration's hash types, and whether its hash takes the
ports and the `_EX` addresses, is read off `select_hash_input` once per kind when the
model is built. The hash is the Toeplitz hash by per-position byte tables (`tables_for`):
``hash = XOR_i T[i][input[i]]``, one table lookup per input byte over the whole batch.

Queues are the ones a frame reaches: the indirection table's entry (or the unclassified
queue) modulo *delivered_queues*, the queues the tap delivers among.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from vnetbackend.rss.config import RssConfig
from vnetbackend.rss.frame import IPPROTO_TCP, IPPROTO_UDP, ParsedFrame, select_hash_input
from vnetbackend.rss.toeplitz import tables_for
from vnetbackend.rss.types import HashReport

#: Kinds of flow: IP version (other, 4, 6) x transport (none, TCP, UDP) x extension headers.
_IP_CODES = ((0, 0), (4, 1), (6, 2))
_L4_CODES = ((0, 0), (IPPROTO_TCP, 1), (IPPROTO_UDP, 2))
KINDS = 3 * 3 * 2


class Flows(NamedTuple):
    """A batch of N parsed flows, as arrays (views of a record array will do).

    ``src``/``dst``: (N, 16) uint8, the IP header's addresses (IPv4 in the first 4
    bytes); ``ex_src``/``ex_dst``: (N, 16) uint8, the `_EX` addresses where
    ``has_ex_src``/``has_ex_dst`` (bool, N) say the flow has them; ``ports``: (N, 4)
    uint8, source and destination port in network order; ``ip_version``, ``l4_proto``
    (6 or 17 where the transport header counts, else 0): uint8, N; ``ext``: bool, N,
    IPv6 extension headers present.
    """

    ip_version: np.ndarray
    l4_proto: np.ndarray
    ext: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    ex_src: np.ndarray
    ex_dst: np.ndarray
    has_ex_src: np.ndarray
    has_ex_dst: np.ndarray
    ports: np.ndarray


class Answers(NamedTuple):
    """The model's answers for a batch: uint32 hashes, uint8 report types, int64 queues."""

    hash: np.ndarray
    report: np.ndarray
    queue: np.ndarray


def kind_codes(ip_version: np.ndarray, l4_proto: np.ndarray, ext: np.ndarray) -> np.ndarray:
    """Each flow's kind, 0..KINDS-1 (see `KINDS`)."""
    ip = (ip_version == 4).astype(np.intp) + 2 * (ip_version == 6)
    l4 = (l4_proto == IPPROTO_TCP).astype(np.intp) + 2 * (l4_proto == IPPROTO_UDP)
    return ip * 6 + l4 * 2 + ext.astype(np.intp)


def _choices(hash_types: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per kind: the report type, whether the ports are hashed, whether the `_EX`
    addresses are, as the scalar model's `select_hash_input` decides them."""
    reports = np.zeros(KINDS, np.uint8)
    ports = np.zeros(KINDS, bool)
    ex = np.zeros(KINDS, bool)
    for version, ip in _IP_CODES:
        width = {4: 4, 6: 16}.get(version, 0)
        for proto, l4 in _L4_CODES:
            for ext in (0, 1):
                if ext and version != 6:
                    continue
                src, dst = b"\x01" * width, b"\x02" * width
                ex_src, ex_dst = b"\x03" * width, b"\x04" * width
                parsed = ParsedFrame(version, 14, src, dst, ex_src, ex_dst, bool(ext), False,
                                     proto, b"\x05" * 4 if proto else b"", 100)
                report, data = select_hash_input(parsed, hash_types)
                kind = ip * 6 + l4 * 2 + ext
                reports[kind] = int(report)
                ports[kind] = len(data) == 2 * width + 4
                ex[kind] = data[:width] == ex_src
    return reports, ports, ex


def _xor_columns(tables: np.ndarray, first: int, columns: np.ndarray, out: np.ndarray) -> None:
    """``out ^= XOR_j tables[first + j][columns[:, j]]``."""
    for j in range(columns.shape[1]):
        out ^= tables[first + j].take(columns[:, j])


class BatchModel:
    """`RssConfig.steer` over arrays for one configuration (None: RSS off) and redirect
    state, with frames delivered among *delivered_queues* queues (None: the configuration's
    own queue count)."""

    def __init__(self, config: RssConfig | None, redirect: bool = True,
                 delivered_queues: int | None = None) -> None:
        self.config = config
        self._redirect = redirect
        types = int(config.hash_types) if config is not None else 0
        self._reports, self._ports, self._ex = _choices(types)
        if config is not None:
            self._tables = np.array(tables_for(config.key), dtype=np.uint32)
            self._table = np.array(config.indirection_table, dtype=np.int64)
            self._delivered = delivered_queues or config.queues
            self._unclassified = config.unclassified_queue % self._delivered

    def answer(self, flows: Flows) -> Answers:
        """Hash, report type and queue for every flow of *flows*."""
        count = len(flows.ip_version)
        kinds = kind_codes(flows.ip_version, flows.l4_proto, flows.ext)
        reports = self._reports[kinds]
        hashes = np.zeros(count, np.uint32)
        if self.config is None:
            return Answers(hashes, reports, np.zeros(count, np.int64))
        with_ports = self._ports[kinds]
        for version, width in ((4, 4), (6, 16)):
            rows = np.flatnonzero((flows.ip_version == version) & (reports != 0))
            if not len(rows):
                continue
            ex = self._ex[kinds[rows]]
            src, dst = flows.src[rows, :width], flows.dst[rows, :width]
            if ex.any():
                src = np.where((ex & flows.has_ex_src[rows])[:, None],
                               flows.ex_src[rows, :width], src)
                dst = np.where((ex & flows.has_ex_dst[rows])[:, None],
                               flows.ex_dst[rows, :width], dst)
            part = np.zeros(len(rows), np.uint32)
            _xor_columns(self._tables, 0, src, part)
            _xor_columns(self._tables, width, dst, part)
            ported = with_ports[rows]
            if ported.any():
                port_hash = np.zeros(len(rows), np.uint32)
                _xor_columns(self._tables, 2 * width, flows.ports[rows], port_hash)
                part ^= np.where(ported, port_hash, np.uint32(0))
            hashes[rows] = part
        if self._redirect:
            queues = self._table[hashes & (len(self._table) - 1)] % self._delivered
            queues[reports == int(HashReport.NONE)] = self._unclassified
        else:
            queues = np.full(count, self._unclassified, np.int64)
        return Answers(hashes, reports, queues)
