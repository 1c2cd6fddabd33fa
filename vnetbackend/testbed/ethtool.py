"""The guest's RSS configuration through its ethtool: set it, and read it back.

Reading back gives an `RssConfig` for the reference model: the key and indirection
table from ``ethtool -x``, the queue count from ``ethtool -l`` and the hash types from
``ethtool -n eth0 rx-flow-hash {tcp4,udp4,tcp6,udp6}``. Linux's virtio_net maps those
answers onto the virtio hash types as follows: a flow type shows ``IP SA, IP DA, L4
bytes 0 & 1, L4 bytes 2 & 3`` when its L4 type (e.g. TCPv4) is set, ``IP SA, IP DA``
when only the IP type of its family (IPv4) is set. The driver sets the IP type whenever
an L4 type of the family is set through ethtool and never sets the ``_EX`` types, so
the six answers determine the mask.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from vnetbackend.errors import VnetError
from vnetbackend.rss import HashType, RssConfig
from vnetbackend.testbed.agent import GuestAgent
from vnetbackend.testbed.driver_issues import device_key

DEVICE = "eth0"
#: ethtool flow type -> (its L4 hash type, its family's IP hash type).
FLOW_TYPES = {
    "tcp4": (HashType.TCPV4, HashType.IPV4),
    "udp4": (HashType.UDPV4, HashType.IPV4),
    "tcp6": (HashType.TCPV6, HashType.IPV6),
    "udp6": (HashType.UDPV6, HashType.IPV6),
}
IP_FIELDS = frozenset({"IP SA", "IP DA"})
L4_FIELDS = IP_FIELDS | {"L4 bytes 0 & 1 [TCP/UDP src port]", "L4 bytes 2 & 3 [TCP/UDP dst port]"}


class EthtoolFormatError(VnetError, ValueError):
    """ethtool printed something this parser does not understand."""


@dataclass(frozen=True, slots=True)
class Rxfh:
    """``ethtool -x``: the RSS key, the indirection table and the rx ring count."""

    key: bytes
    table: tuple[int, ...]
    rings: int


_TABLE_HEAD = re.compile(r"^RX flow hash indirection table for \S+ with (\d+) RX ring\(s\):$")
_TABLE_ROW = re.compile(r"^\s*(\d+):((?:\s+\d+)+)\s*$")
_KEY = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2})*$")


def parse_rxfh(text: str) -> Rxfh:
    """Parse ``ethtool -x DEV``; `EthtoolFormatError` if a part is missing or out of order."""
    lines = [line.rstrip() for line in text.splitlines()]
    rings = None
    table: list[int] = []
    key = None
    for index, line in enumerate(lines):
        head = _TABLE_HEAD.match(line)
        if head:
            rings = int(head.group(1))
            continue
        row = _TABLE_ROW.match(line)
        if row and rings is not None and key is None:
            if int(row.group(1)) != len(table):
                raise EthtoolFormatError(f"indirection row {row.group(1)} after {len(table)} "
                                         f"entries: {line!r}")
            table.extend(int(x) for x in row.group(2).split())
            continue
        if line == "RSS hash key:" and index + 1 < len(lines):
            candidate = lines[index + 1].strip().lower()
            if not _KEY.match(candidate):
                raise EthtoolFormatError(f"RSS hash key line {candidate!r} is not hex bytes")
            key = bytes.fromhex(candidate.replace(":", ""))
    if rings is None or not table or key is None:
        raise EthtoolFormatError(f"no indirection table and key in ethtool -x output:\n{text}")
    return Rxfh(key=key, table=tuple(table), rings=rings)


def parse_combined_channels(text: str) -> tuple[int, int]:
    """(maximum, current) combined channels from ``ethtool -l DEV``."""
    values = re.findall(r"^Combined:\s+(\d+)\s*$", text, re.MULTILINE)
    if len(values) != 2:
        raise EthtoolFormatError(f"expected two 'Combined:' lines in ethtool -l output:\n{text}")
    return int(values[0]), int(values[1])


def parse_flow_hash_fields(text: str) -> frozenset[str]:
    """The field names listed by ``ethtool -n DEV rx-flow-hash FLOW`` (empty: no hashing)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise EthtoolFormatError("empty rx-flow-hash output")
    if "use these fields" not in lines[0]:
        if "not hashed" in lines[0].lower() or "no fields" in lines[0].lower():
            return frozenset()
        raise EthtoolFormatError(f"unexpected rx-flow-hash output:\n{text}")
    return frozenset(lines[1:])


def hash_types_from_flows(fields: dict[str, frozenset[str]]) -> HashType:
    """The virtio hash-type mask the driver holds, from its four rx-flow-hash answers."""
    mask = HashType(0)
    for flow, (l4_type, ip_type) in FLOW_TYPES.items():
        shown = fields[flow]
        if shown == L4_FIELDS:
            mask |= l4_type | ip_type
        elif shown == IP_FIELDS:
            mask |= ip_type
        elif shown:
            raise EthtoolFormatError(f"{flow}: fields {sorted(shown)} are neither sd nor sdfn")
    return mask


class GuestRss:
    """Sets and reads the guest's RSS configuration of eth0 through the agent."""

    def __init__(self, agent: GuestAgent, device: str = DEVICE) -> None:
        self.agent = agent
        self.device = device

    async def set_channels(self, combined: int) -> None:
        _, current = parse_combined_channels(await self.agent.check(f"ethtool -l {self.device}"))
        if current != combined:  # ethtool -L exits non-zero when nothing changes
            await self.agent.check(f"ethtool -L {self.device} combined {combined}")

    async def enable_rxhash(self) -> None:
        """Have the driver keep the reported hash (``rxhash on``); without it, it drops it."""
        await self.agent.check(f"ethtool -K {self.device} rxhash on")

    async def set_rxfh(self, key: bytes | None = None, *, equal: int | None = None,
                       weights: Sequence[int] | None = None) -> None:
        """``ethtool -X``: a new key and/or a table spread evenly or by weight."""
        words = [f"ethtool -X {self.device}"]
        if key is not None:
            words.append("hkey " + ":".join(f"{b:02x}" for b in key))
        if equal is not None:
            words.append(f"equal {equal}")
        if weights is not None:
            words.append("weight " + " ".join(str(w) for w in weights))
        await self.agent.check(" ".join(words))

    async def set_flow_hash(self, flow: str, fields: str) -> None:
        """``ethtool -N DEV rx-flow-hash FLOW FIELDS``, e.g. ("udp4", "sd")."""
        if flow not in FLOW_TYPES:
            raise ValueError(f"flow {flow!r}: the driver supports {list(FLOW_TYPES)}")
        await self.agent.check(f"ethtool -N {self.device} rx-flow-hash {flow} {fields}")

    async def read_hash_types(self) -> HashType:
        script = "; ".join(f"echo '@{flow}'; ethtool -n {self.device} rx-flow-hash {flow}"
                           for flow in FLOW_TYPES)
        output = await self.agent.check(script)
        parts = {chunk.split("\n", 1)[0].strip(): chunk.split("\n", 1)[1]
                 for chunk in output.split("@")[1:]}
        return hash_types_from_flows({flow: parse_flow_hash_fields(parts[flow])
                                      for flow in FLOW_TYPES})

    async def read_config(self) -> RssConfig:
        """The configuration the device holds, as the guest reports it: ethtool's view,
        with the key the device received from this guest's driver (`device_key`: the
        driver's known issues), ready for the reference model.

        The driver's unclassified queue is always 0.
        """
        config = await self.read_guest_view()
        return replace(
            config, key=device_key(config.key, self.agent.kernel_release or ""))

    async def read_guest_view(self) -> RssConfig:
        """The configuration exactly as the guest's ethtool reports it."""
        rxfh = parse_rxfh(await self.agent.check(f"ethtool -x {self.device}"))
        _, combined = parse_combined_channels(await self.agent.check(f"ethtool -l {self.device}"))
        return RssConfig(hash_types=await self.read_hash_types(), key=rxfh.key,
                         indirection_table=rxfh.table, queues=combined)
