"""A guest's RSS configuration, validated, and the steering decision it gives a frame."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from vnetbackend.errors import VnetError
from vnetbackend.rss.frame import (
    ETH_HEADER_LEN,
    IPPROTO_TCP,
    IPPROTO_UDP,
    ParsedFrame,
    parse_frame,
    plain_ipv4_flow,
    select_hash_input,
)
from vnetbackend.rss.toeplitz import ByteTables, hash_with_tables, tables_for
from vnetbackend.rss.types import (
    ALL_HASH_TYPES,
    MAX_KEY_SIZE,
    MAX_QUEUES,
    MAX_TABLE_LENGTH,
    HashReport,
    HashType,
    format_hash_types,
)


class InvalidRssConfig(VnetError, ValueError):
    """An RSS configuration value the device cannot accept.

    ``field`` names the offending field and ``value`` holds what was given.
    """

    def __init__(self, field_name: str, value: object, reason: str) -> None:
        super().__init__(f"RSS {field_name} = {value!r}: {reason}")
        self.field = field_name
        self.value = value


class Steering(NamedTuple):
    """What the device does with one frame."""

    hash: int
    report: HashReport
    queue: int
    hash_input: bytes


@dataclass(frozen=True, slots=True)
class RssConfig:
    """The device's RSS state as the driver set it with VIRTIO_NET_CTRL_MQ_RSS_CONFIG.

    ``queues`` is the number of receive queues in use; every queue index must be below it.
    Construction validates every field and raises `InvalidRssConfig` on the first bad one.
    """

    hash_types: HashType
    key: bytes
    indirection_table: tuple[int, ...]
    queues: int
    unclassified_queue: int = 0
    #: The key's byte tables, built on the first hash (None until then): validating a
    #: configuration, as the mirror does before it writes the maps, does not pay for them.
    _tables: ByteTables | None = field(init=False, repr=False, compare=False)
    _types: int = field(init=False, repr=False, compare=False)  # hash_types as a plain int
    _plain_ipv4: dict[int, tuple[HashReport, int]] = field(init=False, repr=False,
                                                         compare=False)

    def __init__(
        self,
        *,
        hash_types: int,
        key: bytes,
        indirection_table: Sequence[int],
        queues: int,
        unclassified_queue: int = 0,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "queues", _check_queues(queues))
        set_(self, "hash_types", _check_hash_types(hash_types))
        set_(self, "key", _check_key(key))
        set_(self, "indirection_table", _check_table(indirection_table, self.queues))
        set_(self, "unclassified_queue", _check_queue("unclassified_queue",
                                                      unclassified_queue, self.queues))
        set_(self, "_tables", None)
        set_(self, "_types", int(self.hash_types))
        set_(self, "_plain_ipv4", _plain_ipv4_choices(self._types))

    def steer(self, frame: bytes) -> Steering:
        """Hash, report type and receive queue for *frame*; never raises.

        The commonest frames (`plain_ipv4_flow`) take a shorter road to the answer
        ``steer_parsed(parse_frame(frame))`` gives every frame.
        """
        frame = bytes(frame)
        flow = plain_ipv4_flow(frame)
        if flow is None:
            return self.steer_parsed(parse_frame(frame))
        proto, data = flow
        report, length = self._plain_ipv4[proto]
        return self._steering(report, data[:length])

    def steer_parsed(self, parsed: ParsedFrame) -> Steering:
        """`steer` for a frame already read with `parse_frame`."""
        return self._steering(*select_hash_input(parsed, self._types))

    def _steering(self, report: HashReport, data: bytes) -> Steering:
        if report is HashReport.NONE:
            return Steering(0, report, self.unclassified_queue, b"")
        tables = self._tables
        if tables is None:
            tables = tables_for(self.key)
            object.__setattr__(self, "_tables", tables)
        value = hash_with_tables(tables, data)
        table = self.indirection_table
        return Steering(value, report, table[value & (len(table) - 1)], data)


def _plain_ipv4_choices(hash_types: int) -> dict[int, tuple[HashReport, int]]:
    """For a plain IPv4 frame (`plain_ipv4_flow`) by its transport: the report type and how
    many bytes of its addresses and ports are hashed, as `select_hash_input` decides them."""
    choices: dict[int, tuple[HashReport, int]] = {}
    for proto in (IPPROTO_TCP, IPPROTO_UDP):
        frame = ParsedFrame(4, ETH_HEADER_LEN, bytes(4), bytes(4), bytes(4), bytes(4),
                            l4_proto=proto, ports=bytes(4), frame_len=ETH_HEADER_LEN + 40)
        report, data = select_hash_input(frame, hash_types)
        choices[proto] = (report, len(data))
    return choices


def _check_queues(queues: int) -> int:
    if not isinstance(queues, int) or isinstance(queues, bool):
        raise InvalidRssConfig("queues", queues, "must be an integer")
    if not 1 <= queues <= MAX_QUEUES:
        raise InvalidRssConfig("queues", queues, f"must be in 1..{MAX_QUEUES}")
    return queues


def _check_hash_types(hash_types: int) -> HashType:
    if not isinstance(hash_types, int) or isinstance(hash_types, bool):
        raise InvalidRssConfig("hash_types", hash_types, "must be an integer bit mask")
    unknown = hash_types & ~int(ALL_HASH_TYPES)
    if hash_types < 0 or unknown:
        raise InvalidRssConfig("hash_types", hash_types,
                               f"unknown bits 0x{unknown & 0xFFFFFFFF:x} (known: 0x1ff)")
    return HashType(hash_types)


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray | memoryview):
        raise InvalidRssConfig("key", key, "must be bytes")
    key = bytes(key)
    if not 1 <= len(key) <= MAX_KEY_SIZE:
        raise InvalidRssConfig("key", key.hex(),
                               f"length {len(key)} is outside 1..{MAX_KEY_SIZE} bytes")
    return key


def _check_queue(name: str, queue: object, queues: int) -> int:
    if not isinstance(queue, int) or isinstance(queue, bool):
        raise InvalidRssConfig(name, queue, "must be an integer queue index")
    if not 0 <= queue < queues:
        raise InvalidRssConfig(name, queue, f"queue index outside 0..{queues - 1}")
    return queue


def _check_table(table: Sequence[int], queues: int) -> tuple[int, ...]:
    try:
        entries = tuple(table)
    except TypeError:
        raise InvalidRssConfig("indirection_table", table, "must be a sequence") from None
    length = len(entries)
    if not 1 <= length <= MAX_TABLE_LENGTH or length & (length - 1):
        raise InvalidRssConfig("indirection_table", length,
                               f"length must be a power of two in 1..{MAX_TABLE_LENGTH}")
    for index, queue in enumerate(entries):
        _check_queue(f"indirection_table[{index}]", queue, queues)
    return entries


def rss_view(config: RssConfig | None) -> dict[str, Any] | None:
    """*config* as JSON-ready values (None stays None), for events and query results."""
    if config is None:
        return None
    return {
        "hash-types": int(config.hash_types),
        "hash-type-names": format_hash_types(config.hash_types),
        "key": config.key.hex(),
        "indirection-table": list(config.indirection_table),
        "unclassified-queue": config.unclassified_queue,
        "queues": config.queues,
    }
