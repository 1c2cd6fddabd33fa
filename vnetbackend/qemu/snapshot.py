"""The virtio-net device's state as QEMU holds it, read from a device-state snapshot.

QMP ``xen-save-devices-state {filename, live: false}`` writes every device's state in the
migration stream format (it works without Xen and pauses the VM for a few milliseconds);
`vnetbackend.qemu.vmstate` describes the format. Part of a virtio-net section is chosen
by the guest (the MAC filter table, the VLAN filter, PCI config and MSI-X table contents,
queue addresses), so nothing here is found by searching for it: the section is walked
field by field as the QEMU version that wrote it lays it out, every length is read from
the stream where QEMU records it or derived from what the caller knows, and the walk
must end exactly on the section's footer (``0x7e`` and the section's own id), at a
place where a section may end. A value can only be taken from the position the walk
gives it, so bytes a guest planted elsewhere are read as the data they are.

The walk of a virtio-net-pci section (QEMU's ``virtio_save``), in order:

- the PCI device: be32 version (2), config space (256 bytes, or 4096 for a PCI Express
  device), four be32 interrupt levels; then, when the device has MSI-X, its table
  (16 bytes per vector), its pending bits (one bit per vector, rounded up to bytes) and
  the be16 config vector. Whether the device is PCI Express and how many vectors it has
  are read from the capability list in the saved config space, which QEMU builds and
  the guest cannot write;
- virtio: status u8, isr u8, queue_sel be16, the guest's features (low 32 bits) be32,
  be32 config length and the config; be32 queue count, then per queue vring size be32,
  descriptor address be64, last available index be16 and (with MSI-X) its vector be16;
- the virtio-net fields the layout lists (MAC filter table, VLAN filter, queue pairs...),
  then its subsection ``virtio-net-device/rss`` when RSS is on, then virtio's own
  subsections, each of a size the layout knows, then the footer. A subsection the
  layout does not know, or knows as opaque (a vhost-user back end's state, QEMU 10.0),
  stops the walk there with an error naming its offset.

The section itself is found by its header (``0x04``, section id, name
``<pci address>/virtio-net``, instance, version): the stream holds other devices'
sections, whose layouts are not known here, so a header is only a candidate. Every
candidate is walked; the state comes from the one whose walk is complete, and a stream
where none, or more than one, starts a complete section is refused. A forged header is
harmless unless the guest also makes everything after it walk, through checked values
and lengths, to a footer; a guest that achieves that makes its own snapshots refused,
never misread.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vnetbackend.qemu.vmstate import (
    SECTION_FOOTER,
    SECTION_FULL,
    SECTION_HEADER,
    SECTION_TAIL,
    STREAM_EOF,
    STREAM_MAGIC,
    STREAM_VERSION,
    SUBSECTION,
    Cursor,
    Fixed,
    IfFeature,
    MacTable,
    QemuVersion,
    QueuePairs,
    RssLayout,
    SnapshotError,
    Subsection,
    TxWaiting,
    VirtioNetLayout,
    layout_for,
)
from vnetbackend.rss import RssConfig

__all__ = ["DeviceState", "RssState", "SnapshotError", "read_device_state"]

DEVICE_SUFFIX = "/virtio-net"
ETH_ALEN = 6
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10
PCI_CAPABILITY_LIST = 0x34
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11
PCI_MSIX_TABLE_SIZE = 0x07FF
#: The first capability sits after the standard header; each takes at least 4 bytes.
PCI_CAP_FIRST = 0x40
_STREAM_HEADER = STREAM_MAGIC + STREAM_VERSION.to_bytes(4, "big")


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


@dataclass(frozen=True, slots=True)
class DeviceState:
    """One virtio-net device as QEMU holds it.

    ``rss`` is None while RSS (and hash reporting) is off. ``curr_queue_pairs`` is the
    number of queue pairs QEMU serves, i.e. the tap queues it keeps attached (1 for a
    device with a single pair). ``mac`` is the device's MAC address.
    """

    rss: RssState | None
    curr_queue_pairs: int
    mac: bytes


def read_device_state(stream: bytes, pci_address: str, qemu_version: QemuVersion,
                      max_queue_pairs: int) -> DeviceState:
    """The state of the virtio-net device at *pci_address*.

    *pci_address* is the device's path as QEMU names its state: ``0000:00:02.0`` on the
    root bus, ``0000:00:03.0:00.0`` behind the bridge at ``00:03.0``.

    *qemu_version* is (major, minor, micro) as QMP ``query-version`` reports it for the
    QEMU that wrote *stream*; *max_queue_pairs* is the device's number of queue pairs
    (its tap queues), which decides fields the stream does not announce. The stream
    must agree with it: QEMU saves the maximum when it exceeds 1 and checks it on
    loading, and so does this reader.

    Raises `SnapshotError` (naming the QEMU version, the field and the byte offset) when
    the version's layout is not known, the stream is not a device-state stream, holds no
    such device, or its section cannot be walked to its footer as that version writes
    it; and when more than one place in the stream walks as that device's section.
    """
    if max_queue_pairs < 1:
        raise ValueError(f"max_queue_pairs {max_queue_pairs}: a device has at least one")
    layout = layout_for(qemu_version)
    name = f"{pci_address}{DEVICE_SUFFIX}"
    context = f"QEMU {'.'.join(map(str, qemu_version))} device state, {name}"
    if not stream.startswith(_STREAM_HEADER):
        raise SnapshotError(f"{context}: not a device-state stream (no QEVM header)",
                            offset=0, field="stream header")
    starts = _section_starts(stream, name.encode())
    if not starts:
        raise SnapshotError(f"{context}: no such device in the snapshot")
    walked: list[tuple[int, DeviceState]] = []
    failures: list[SnapshotError] = []
    for start in starts:
        try:
            walked.append((start, _walk_section(Cursor(stream, start, context), layout,
                                                max_queue_pairs)))
        except SnapshotError as err:
            failures.append(err)
    if len(walked) == 1:
        return walked[0][1]
    if walked:
        raise SnapshotError(f"{context}: the sections at offsets "
                            f"{', '.join(str(at) for at, _ in walked)} all walk to a "
                            "footer; refusing to pick one", offset=walked[1][0],
                            field="section header")
    if len(failures) == 1:
        raise failures[0]
    first = failures[0]
    raise SnapshotError(f"{context}: none of the {len(starts)} section headers (offsets "
                        f"{', '.join(map(str, starts))}) starts a complete section; the "
                        f"first fails with: {first}", offset=first.offset, field=first.field)


def _section_starts(stream: bytes, name: bytes) -> list[int]:
    """Offsets of every full-section header carrying *name* (candidates, not proof)."""
    needle = bytes([len(name)]) + name
    starts = []
    hit = stream.find(needle, len(_STREAM_HEADER))
    while hit >= 0:
        start = hit - (SECTION_HEADER.size - 1)
        if start >= len(_STREAM_HEADER) and stream[start] == SECTION_FULL:
            starts.append(start)
        hit = stream.find(needle, hit + 1)
    return starts


def _walk_section(cur: Cursor, layout: VirtioNetLayout, max_pairs: int) -> DeviceState:
    """Walk the section starting at *cur* to its footer; the device's state."""
    start = cur.pos
    if start != len(_STREAM_HEADER) and cur.data[start - 5] != SECTION_FOOTER:
        raise cur.error("section header", "follows neither the stream header nor a "
                                          "section footer")
    _, section_id, length = SECTION_HEADER.unpack(cur.take(SECTION_HEADER.size,
                                                           "section header"))
    cur.skip(length, "section name")
    at = cur.pos
    _, version = SECTION_TAIL.unpack(cur.take(SECTION_TAIL.size, "section instance, version"))
    if version != layout.section_version:
        raise cur.error("section version", f"is {version}, this layout writes "
                                           f"{layout.section_version}", at)
    vectors = _pci_transport(cur, layout)
    features = _virtio_common(cur, layout, vectors, max_pairs)
    mac, curr_pairs = _device_fields(cur, layout, features, max_pairs)
    rss = _rss(cur, layout.rss) if cur.peek_subsection() == layout.rss.name else None
    opaque = cur.peek_subsection()
    if opaque in layout.opaque_subsections:
        raise cur.error(f"{opaque} subsection", "holds a back end's own state, whose "
                                                "length the stream does not record")
    _subsections(cur, layout.virtio_subsections)
    cur.expect(bytes([SECTION_FOOTER]) + section_id.to_bytes(4, "big"), "section footer")
    after = cur.data[cur.pos : cur.pos + 1]
    if after != bytes([SECTION_FULL]) and (after != bytes([STREAM_EOF])
                                           or cur.pos + 1 != len(cur.data)):
        raise cur.error("after the section footer", "neither another section nor the "
                                                    "end of the stream")
    return DeviceState(rss=rss, curr_queue_pairs=curr_pairs, mac=mac)


def _pci_transport(cur: Cursor, layout: VirtioNetLayout) -> int:
    """Walk the PCI device's state and its MSI-X table; the number of MSI-X vectors."""
    at = cur.pos
    version = cur.uint(4, "PCIDevice.version_id")
    if version != layout.pci_version:
        raise cur.error("PCIDevice.version_id", f"is {version}, expected "
                                                f"{layout.pci_version}", at)
    at = cur.pos
    config = cur.take(layout.pci_config_size, "PCIDevice.config")
    express, vectors = _capabilities(cur, config, at)
    if express:
        cur.skip(layout.pcie_config_size - layout.pci_config_size,
                 "PCIDevice.config (PCI Express extended space)")
    cur.skip(4 * layout.pci_irq_pins, "PCIDevice.irq_state")
    if vectors:
        cur.skip(vectors * layout.msix_entry_size, "MSI-X table")
        cur.skip((vectors + 7) // 8, "MSI-X pending bits")
        cur.skip(2, "virtio config_vector")
    return vectors


def _capabilities(cur: Cursor, config: bytes, at: int) -> tuple[bool, int]:
    """(PCI Express?, MSI-X vectors) from the capability list of *config* (saved at *at*).

    QEMU builds the list and keeps it read-only for the guest. A virtio-pci device is
    PCI Express exactly when it carries the PCI Express capability.
    """
    express, vectors = False, 0
    if not config[PCI_STATUS] & PCI_STATUS_CAP_LIST:
        return express, vectors
    seen: set[int] = set()
    pointer = config[PCI_CAPABILITY_LIST] & ~3
    while pointer:
        if pointer < PCI_CAP_FIRST or pointer in seen:
            raise cur.error("PCIDevice.config capability list",
                            f"bad capability pointer {pointer:#x}", at + PCI_CAPABILITY_LIST)
        seen.add(pointer)
        if config[pointer] == PCI_CAP_ID_EXP:
            express = True
        elif config[pointer] == PCI_CAP_ID_MSIX:
            control = int.from_bytes(config[pointer + 2 : pointer + 4], "little")
            vectors = (control & PCI_MSIX_TABLE_SIZE) + 1
        pointer = config[pointer + 1] & ~3
    return express, vectors


def _virtio_common(cur: Cursor, layout: VirtioNetLayout, vectors: int, max_pairs: int) -> int:
    """Walk virtio's common fields and queues; the guest's features (low 32 bits)."""
    cur.skip(1 + 1 + 2, "virtio status, isr, queue_sel")
    features = cur.uint(4, "virtio guest_features")
    at = cur.pos
    config_len = cur.uint(4, "virtio config_len")
    if config_len > layout.max_config:
        raise cur.error("virtio config_len", f"is {config_len}, QEMU saves at most "
                                             f"{layout.max_config}", at)
    cur.skip(config_len, "virtio config")
    at = cur.pos
    queues = cur.uint(4, "virtio queue count")
    # Receive and transmit queue per pair, then the control queue; a driver that does
    # not negotiate multiqueue leaves one pair.
    if queues not in (3, 2 * max_pairs + 1):
        raise cur.error("virtio queue count", f"is {queues}, a device with {max_pairs} "
                                              f"queue pairs has 3 or {2 * max_pairs + 1}", at)
    for queue in range(queues):
        at = cur.pos
        if cur.uint(4, f"virtio queue {queue} vring.num") == 0:
            raise cur.error(f"virtio queue {queue} vring.num", "is 0: QEMU saves only "
                                                                "queues that exist", at)
        cur.skip(8 + 2, f"virtio queue {queue} desc, last_avail_idx")
        if vectors:
            cur.skip(2, f"virtio queue {queue} vector")
    return features


def _device_fields(cur: Cursor, layout: VirtioNetLayout, features: int,
                   max_pairs: int) -> tuple[bytes, int]:
    """Walk the virtio-net fields; (MAC, queue pairs in use)."""
    values: dict[str, bytes] = {}
    curr_pairs = 1
    for field in layout.device_fields:
        match field:
            case Fixed(name, size):
                values[name] = cur.take(size, name)
            case MacTable(name, entries):
                in_use = cur.uint(4, f"{name}.in_use")
                at = cur.pos
                macs = cur.take(in_use * ETH_ALEN, f"{name}.macs")
                if in_use > entries and any(macs):
                    raise cur.error(f"{name}.macs", f"{in_use} entries do not fit in "
                                                    f"{entries}: QEMU saves zeros", at)
            case QueuePairs():
                if max_pairs > 1:
                    at = cur.pos
                    saved = cur.uint(2, "max_queue_pairs")
                    if saved != max_pairs:
                        raise cur.error("max_queue_pairs", f"is {saved}, the device has "
                                                           f"{max_pairs}", at)
                    at = cur.pos
                    curr_pairs = cur.uint(2, "curr_queue_pairs")
                    if not 1 <= curr_pairs <= max_pairs:
                        raise cur.error("curr_queue_pairs", f"is {curr_pairs}, not in "
                                                            f"1..{max_pairs}", at)
            case TxWaiting():
                cur.skip(4 * (curr_pairs - 1), "vqs[1:].tx_waiting")
            case IfFeature(name, size, bit):
                if features >> bit & 1:
                    cur.skip(size, name)
    return values["mac"], curr_pairs


def _rss(cur: Cursor, rss: RssLayout) -> RssState:
    """Walk the RSS subsection that starts at *cur*."""
    _subsection_header(cur, rss.name, rss.version)
    enabled = cur.flag(f"{rss.name} enabled")
    redirect = cur.flag(f"{rss.name} redirect")
    populate_hash = cur.flag(f"{rss.name} populate_hash")
    hash_types = cur.uint(4, f"{rss.name} hash_types")
    at = cur.pos
    table_len = cur.uint(2, f"{rss.name} indirections_len")
    if table_len > rss.max_table:
        raise cur.error(f"{rss.name} indirections_len", f"is {table_len}, QEMU holds at "
                                                        f"most {rss.max_table}", at)
    default_queue = cur.uint(2, f"{rss.name} default_queue")
    key = cur.take(rss.key_size, f"{rss.name} key")
    table = struct.unpack(f">{table_len}H", cur.take(2 * table_len,
                                                     f"{rss.name} indirections_table"))
    return RssState(enabled, redirect, populate_hash, hash_types, default_queue, key, table)


def _subsections(cur: Cursor, known: tuple[Subsection, ...]) -> None:
    """Walk those of the *known* subsections (in QEMU's order) that start here in turn."""
    for sub in known:
        if cur.peek_subsection() == sub.name:
            _subsection_header(cur, sub.name, sub.version)
            cur.skip(sub.size, sub.name)
            _subsections(cur, sub.subsections)


def _subsection_header(cur: Cursor, name: str, version: int) -> None:
    raw = name.encode()
    cur.expect(bytes([SUBSECTION, len(raw)]) + raw, f"{name} subsection header")
    at = cur.pos
    found = cur.uint(4, f"{name} version")
    if found != version:
        raise cur.error(f"{name} version", f"is {found}, this layout knows {version}", at)

