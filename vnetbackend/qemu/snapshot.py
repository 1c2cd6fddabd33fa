"""The guest's RSS state as QEMU holds it, read from a device-state snapshot.

QMP ``xen-save-devices-state {filename, live: false}`` writes every device's state in the
migration stream format (it works without Xen and pauses the VM for a few milliseconds).
The stream is not self-describing, so it is not walked field by field; instead the
parser finds each virtio-net section header (``0x04``, section id, name ending in
``/virtio-net``, instance, version) and the ``virtio-net-device/rss`` subsection
(``0x05``, name, version) that follows it. That subsection is present only while RSS (or
hash reporting) is enabled; its fields are big-endian: enabled u8, redirect u8,
populate_hash u8, hash_types u32, indirections_len u16, default_queue u16, key[40],
then indirections_len u16 queue indices.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vnetbackend.errors import VnetError
from vnetbackend.rss import RssConfig

STREAM_MAGIC = b"QEVM"
SECTION_FULL = 0x04
SUBSECTION = 0x05
DEVICE_SUFFIX = b"/virtio-net"
RSS_SUBSECTION = b"virtio-net-device/rss"
RSS_SUBSECTION_VERSION = 1
KEY_FIELD_SIZE = 40
_FIXED = struct.Struct(">BBBIHH")


class SnapshotError(VnetError, ValueError):
    """A device-state file that cannot be read as QEMU's stream, or whose RSS part is bad."""


@dataclass(frozen=True, slots=True)
class RssState:
    """The RSS subsection of one virtio-net device, as stored (not yet validated).

    ``redirect`` is true when the guest set RSS (queue steering), false when it only set
    hash calculation for reports; ``populate_hash`` is true when hashes are reported.
    """

    enabled: bool
    redirect: bool
    populate_hash: bool
    hash_types: int
    default_queue: int
    key: bytes
    indirection_table: tuple[int, ...]

    def to_config(self, queues: int) -> RssConfig:
        """The validated configuration, with *queues* receive queues in use.

        Without ``redirect`` the guest asked only for hashes, not for steering by them:
        every frame then goes to the default queue while its hash is still computed.
        Raises `vnetbackend.rss.InvalidRssConfig` when a stored value is out of
        specification.
        """
        table = self.indirection_table if self.redirect else (self.default_queue,)
        return RssConfig(hash_types=self.hash_types, key=self.key, indirection_table=table,
                         queues=queues, unclassified_queue=self.default_queue)


def _section_headers(stream: bytes) -> list[tuple[int, str]]:
    """(offset just past the header, device name) of each virtio-net section header.

    A header is ``0x04``, be32 section id, u8 name length, the name, be32 instance id and
    be32 version; the name ends in ``/virtio-net`` (e.g. ``0000:00:02.0/virtio-net``).
    """
    found = []
    start = 0
    while (hit := stream.find(DEVICE_SUFFIX, start)) >= 0:
        start = hit + 1
        name_end = hit + len(DEVICE_SUFFIX)
        for length in range(len(DEVICE_SUFFIX), min(256, name_end - 5)):
            name_start = name_end - length
            if stream[name_start - 1] == length and stream[name_start - 6] == SECTION_FULL:
                name = stream[name_start:name_end]
                if name.isascii() and name.decode().isprintable():
                    found.append((name_end + 8, name.decode()))
                break
    return found


def _parse_subsection(stream: bytes, at: int) -> RssState:
    marker = bytes([SUBSECTION, len(RSS_SUBSECTION)]) + RSS_SUBSECTION
    pos = at + len(marker)
    if len(stream) < pos + 4 + _FIXED.size + KEY_FIELD_SIZE:
        raise SnapshotError("RSS subsection is truncated")
    (version,) = struct.unpack_from(">I", stream, pos)
    if version != RSS_SUBSECTION_VERSION:
        raise SnapshotError(f"RSS subsection version {version}, expected {RSS_SUBSECTION_VERSION}")
    pos += 4
    enabled, redirect, populate, hash_types, table_len, default_queue = _FIXED.unpack_from(
        stream, pos)
    pos += _FIXED.size
    key = stream[pos : pos + KEY_FIELD_SIZE]
    pos += KEY_FIELD_SIZE
    if len(stream) < pos + 2 * table_len:
        raise SnapshotError(f"RSS indirection table of {table_len} entries is truncated")
    table = struct.unpack_from(f">{table_len}H", stream, pos)
    for name, flag in (("enabled", enabled), ("redirect", redirect), ("populate_hash", populate)):
        if flag > 1:
            raise SnapshotError(f"RSS field {name} holds {flag}, not a boolean")
    return RssState(bool(enabled), bool(redirect), bool(populate), hash_types, default_queue,
                    key, table)


def parse_snapshot(stream: bytes) -> dict[str, RssState | None]:
    """RSS state per virtio-net device (by section name), None where RSS is off.

    Raises `SnapshotError` when *stream* is not a device-state stream or an RSS
    subsection in it is malformed.
    """
    if not stream.startswith(STREAM_MAGIC):
        raise SnapshotError("not a QEMU device-state stream (no QEVM magic)")
    sections = _section_headers(stream)
    states: dict[str, RssState | None] = {name: None for _, name in sections}
    marker = bytes([SUBSECTION, len(RSS_SUBSECTION)]) + RSS_SUBSECTION
    start = 0
    while (hit := stream.find(marker, start)) >= 0:
        start = hit + 1
        owners = [name for body, name in sections if body <= hit]
        if not owners:
            raise SnapshotError(f"RSS subsection at offset {hit} outside a virtio-net section")
        states[owners[-1]] = _parse_subsection(stream, hit)
    return states


def device_rss_state(stream: bytes, pci_address: str | None = None) -> RssState | None:
    """The RSS state of the virtio-net device at *pci_address* (e.g. ``0000:00:02.0``).

    Without an address the stream must hold exactly one virtio-net device.
    """
    states = parse_snapshot(stream)
    if pci_address is not None:
        name = f"{pci_address}/virtio-net"
        if name not in states:
            raise SnapshotError(f"no virtio-net device {pci_address} in the snapshot "
                                f"(found: {', '.join(states) or 'none'})")
        return states[name]
    if len(states) != 1:
        raise SnapshotError(f"expected one virtio-net device, found {len(states)}: "
                            f"{', '.join(states) or 'none'}")
    return next(iter(states.values()))

