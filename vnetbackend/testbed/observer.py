"""What the guest received, frame by frame, from its own kernel's tracepoint.

The tracepoint ``net/napi_gro_receive_entry`` fires when virtio_net hands a received
frame to the stack. It prints, among others, ``queue_mapping=`` (the rx queue + 1, as
recorded by the driver), ``protocol=`` (the ethertype after the Ethernet header, so
``0x8100`` for a VLAN-tagged frame), ``hash=`` and ``l4_hash=`` (the hash and whether it
covers ports, both set from the device's hash report) and ``len=`` (bytes after the
14-byte Ethernet header). The guest's sed reduces each event to those five fields so
that the serial port carries a few bytes per frame.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vnetbackend.checker import Expectation, guest_key
from vnetbackend.errors import VnetError
from vnetbackend.testbed.agent import GuestAgent

TRACEFS = "/sys/kernel/tracing"
EVENT = "events/net/napi_gro_receive_entry"
#: Per-CPU trace buffer; far more than a batch of a few hundred frames needs.
BUFFER_KB = 4096

_FIELDS = ("queue_mapping", "protocol", "hash", "l4_hash", "len")
#: The guest-side sed program that keeps the five fields of each eth0 event.
REDUCE_SED = (r"s/.* dev=eth0 .*queue_mapping=\([0-9]*\) .* protocol=\(0x[0-9a-f]*\) "
           r".* hash=\(0x[0-9a-f]*\) l4_hash=\([0-9]*\) len=\([0-9]*\) .*/\1 \2 \3 \4 \5/p")
_RECORD = re.compile(r"^(\d+) (0x[0-9a-f]+) (0x[0-9a-f]+) (\d+) (\d+)$")


class TraceFormatError(VnetError, ValueError):
    """A reduced trace line that does not have the expected five fields."""


@dataclass(frozen=True, slots=True)
class RxRecord:
    """One frame as the guest's driver received it."""

    queue: int
    protocol: int
    hash: int
    l4_hash: bool
    l3_len: int

    @classmethod
    def of(cls, frame: bytes, seen: Expectation) -> RxRecord:
        """The record the guest gives when *frame* arrives as *seen* says."""
        l3_len, protocol = guest_key(frame)
        return cls(queue=seen.queue, protocol=protocol, hash=seen.hash,
                   l4_hash=seen.l4_hash, l3_len=l3_len)


def parse_records(text: str) -> list[RxRecord]:
    """Records from the guest's reduced trace: ``queue_mapping protocol hash l4_hash len``."""
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _RECORD.match(line.strip())
        if not match:
            raise TraceFormatError(f"unexpected trace line {line!r} (fields: {_FIELDS})")
        mapping, protocol, value, l4_hash, length = match.groups()
        if int(mapping) < 1:
            raise TraceFormatError(f"queue_mapping 0 (no rx queue recorded) in {line!r}")
        records.append(RxRecord(queue=int(mapping) - 1, protocol=int(protocol, 16),
                                hash=int(value, 16), l4_hash=l4_hash != "0",
                                l3_len=int(length)))
    return records


class RxObserver:
    """Switches the tracepoint on in the guest and collects what it recorded."""

    def __init__(self, agent: GuestAgent) -> None:
        self.agent = agent

    async def start(self) -> None:
        """Enable the event (only for eth0) and empty the buffer."""
        await self.agent.check(
            f"cd {TRACEFS} && echo {BUFFER_KB} > buffer_size_kb"
            f" && echo 'name == \"eth0\"' > {EVENT}/filter"
            f" && echo 1 > {EVENT}/enable && echo 1 > tracing_on && echo > trace")

    async def clear(self) -> None:
        await self.agent.check(f"echo > {TRACEFS}/trace")

    async def collect(self, clear: bool = True) -> list[RxRecord]:
        """Everything received since the last clear; then clear (unless told not to)."""
        then_clear = f" && echo > {TRACEFS}/trace" if clear else ""
        output = await self.agent.check(f"sed -n '{REDUCE_SED}' {TRACEFS}/trace{then_clear}")
        return parse_records(output)

    async def stop(self) -> None:
        await self.agent.check(f"echo 0 > {TRACEFS}/{EVENT}/enable")
