"""QEMU's device-state stream: a bounded reader, and the virtio-net-pci layout per version.

The stream (QMP ``xen-save-devices-state``) is ``QEVM``, be32 version 3, then one section
per device: ``0x04``, be32 section id, u8 name length, the name, be32 instance id, be32
version, the device's fields, then the footer ``0x7e`` and the section id again; one
``0x00`` ends the stream. A vmstate description writes its fields, then each of its
subsections that is needed, in the order it declares them: ``0x05``, u8 name length, the
name (prefixed by the description's own name and ``/``), be32 version, the fields, and
that subsection's own subsections. Integers are big-endian, booleans one byte (0 or 1).

Nothing in the stream says how long a field is or where the fields end: a reader must
know the layout, and the layout can change between QEMU versions. `LAYOUTS` holds it per
version, as data; `layout_for` refuses a version it does not hold. A version is added
only with streams that QEMU version wrote (``tests/data/device-state/MAJOR.MINOR/``)
and a reading of its source; ``qemu-configs/README.md`` ("QEMU 10.0: the device state")
records what changed from 7.2 to 10.0 and the evidence.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass

from vnetbackend.errors import VnetError

QemuVersion = tuple[int, int, int]


class SnapshotError(VnetError, ValueError):
    """A device-state stream that cannot be read as QEMU wrote it.

    ``offset`` (when known) is the byte offset in the stream where reading failed and
    ``field`` the field that was being read there; the message names both.
    """

    def __init__(self, message: str, *, offset: int | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.offset = offset
        self.field = field


class Cursor:
    """Reads *data* front to back from *pos*; no read goes past the end unnoticed.

    Every read names the field it reads, so that a short or inconsistent stream raises
    `SnapshotError` with *context* (e.g. the QEMU version), the field and its offset.
    """

    def __init__(self, data: bytes, pos: int, context: str) -> None:
        self.data = data
        self.pos = pos
        self.context = context

    def error(self, field: str, problem: str, at: int | None = None) -> SnapshotError:
        offset = self.pos if at is None else at
        return SnapshotError(f"{self.context}: {field} at offset {offset}: {problem}",
                             offset=offset, field=field)

    def take(self, size: int, field: str) -> bytes:
        """The next *size* bytes."""
        end = self.pos + size
        if end > len(self.data):
            raise self.error(field, f"needs {size} bytes, the stream ends "
                                    f"{len(self.data) - self.pos} bytes later")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def skip(self, size: int, field: str) -> None:
        """Pass over the next *size* bytes (a field whose value does not matter here)."""
        if self.pos + size > len(self.data):
            raise self.error(field, f"needs {size} bytes, the stream ends "
                                    f"{len(self.data) - self.pos} bytes later")
        self.pos += size

    def uint(self, size: int, field: str) -> int:
        """A big-endian unsigned integer of *size* bytes."""
        return int.from_bytes(self.take(size, field), "big")

    def flag(self, field: str) -> bool:
        """A boolean: one byte, 0 or 1."""
        at = self.pos
        value = self.uint(1, field)
        if value > 1:
            raise self.error(field, f"holds {value}, not a boolean", at)
        return bool(value)

    def expect(self, wanted: bytes, field: str) -> None:
        """The next bytes must be *wanted*."""
        at = self.pos
        found = self.take(len(wanted), field)
        if found != wanted:
            raise self.error(field, f"found {found.hex()}, expected {wanted.hex()}", at)

    def peek_subsection(self) -> str | None:
        """The name of the subsection that starts here, or None when none does."""
        if self.pos + 2 > len(self.data) or self.data[self.pos] != SUBSECTION:
            return None
        length = self.data[self.pos + 1]
        name = self.data[self.pos + 2 : self.pos + 2 + length]
        return name.decode("latin-1") if len(name) == length else None


STREAM_MAGIC = b"QEVM"
STREAM_VERSION = 3
SECTION_FULL = 0x04
SUBSECTION = 0x05
SECTION_FOOTER = 0x7E
STREAM_EOF = 0x00
SECTION_HEADER = struct.Struct(">BIB")  # marker, section id, name length
SECTION_TAIL = struct.Struct(">II")  # instance id, version


@dataclass(frozen=True, slots=True)
class Fixed:
    """A field of *size* bytes."""

    name: str
    size: int


@dataclass(frozen=True, slots=True)
class MacTable:
    """be32 entries in use, then that many 6-byte addresses.

    When more are in use than the table holds (*entries*), QEMU saves that many zero
    bytes instead of addresses (and a loading QEMU takes the table as overflowed).
    """

    name: str
    entries: int


@dataclass(frozen=True, slots=True)
class QueuePairs:
    """Present when the device has more than one queue pair: be16 the device's maximum
    (equal to the device's, as QEMU checks on loading), be16 the pairs in use."""


@dataclass(frozen=True, slots=True)
class TxWaiting:
    """One be32 per queue pair in use beyond the first (none when none is in use)."""


@dataclass(frozen=True, slots=True)
class IfFeature:
    """A field of *size* bytes, present when the guest negotiated feature *bit* (< 32)."""

    name: str
    size: int
    bit: int


DeviceField = Fixed | MacTable | QueuePairs | TxWaiting | IfFeature


@dataclass(frozen=True, slots=True)
class Subsection:
    """A subsection whose fields take *size* bytes, followed by its own *subsections*."""

    name: str
    version: int
    size: int
    subsections: tuple[Subsection, ...] = ()


@dataclass(frozen=True, slots=True)
class RssLayout:
    """The virtio-net RSS subsection: enabled u8, redirect u8, populate_hash u8,
    hash_types be32, table length be16, default queue be16, the key, the table (be16 each).

    It is saved only while RSS (or hash reporting) is enabled.
    """

    name: str
    version: int
    key_size: int
    max_table: int


@dataclass(frozen=True, slots=True)
class VirtioNetLayout:
    """What one QEMU version writes for a virtio-net-pci device, beyond the fixed framing.

    The framing (see `vnetbackend.qemu.snapshot`) is the PCI device's state, its MSI-X
    table, virtio's common fields and queues, the virtio-net device's ``device_fields``,
    its subsections (``rss``, then any of ``opaque_subsections``), then virtio's
    ``virtio_subsections``.

    ``opaque_subsections`` are virtio-net subsections this version may write whose
    content is another program's own stream with no length recorded (a vhost-user back
    end's state): a section holding one cannot be walked, and is refused by its name.
    """

    section_version: int
    pci_version: int
    pci_config_size: int
    pcie_config_size: int
    pci_irq_pins: int
    msix_entry_size: int
    max_config: int
    queue_max: int
    device_fields: tuple[DeviceField, ...]
    rss: RssLayout
    virtio_subsections: tuple[Subsection, ...]
    opaque_subsections: tuple[str, ...] = ()


_QUEUE_MAX_7_2 = 1024  # VIRTIO_QUEUE_MAX: the per-queue subsections cover every slot

#: QEMU 7.2 (hw/net/virtio-net.c, hw/virtio/virtio.c, hw/virtio/virtio-pci.c, hw/pci/pci.c);
#: every subsection but device_endian, broken and disabled is in
#: tests/data/device-state/7.2/.
QEMU_7_2 = VirtioNetLayout(
    section_version=11,
    pci_version=2,
    pci_config_size=256,
    pcie_config_size=4096,
    pci_irq_pins=4,
    msix_entry_size=16,
    # struct virtio_net_config up to supported_hash_types: QEMU saves at most this much.
    max_config=24,
    queue_max=_QUEUE_MAX_7_2,
    device_fields=(
        Fixed("mac", 6),
        Fixed("vqs[0].tx_waiting", 4),
        Fixed("mergeable_rx_bufs", 4),
        Fixed("status", 2),
        Fixed("promisc", 1),
        Fixed("allmulti", 1),
        MacTable("mac_table", entries=64),
        Fixed("vlans", 512),
        Fixed("has_vnet_hdr", 4),
        Fixed("mac_table.multi_overflow", 1),
        Fixed("mac_table.uni_overflow", 1),
        Fixed("alluni", 1),
        Fixed("nomulti", 1),
        Fixed("nouni", 1),
        Fixed("nobcast", 1),
        Fixed("has_ufo", 1),
        QueuePairs(),
        TxWaiting(),
        IfFeature("curr_guest_offloads", 8, bit=2),  # VIRTIO_NET_F_CTRL_GUEST_OFFLOADS
    ),
    rss=RssLayout("virtio-net-device/rss", version=1, key_size=40, max_table=128),
    virtio_subsections=(
        Subsection("virtio/device_endian", 1, 1),
        Subsection("virtio/64bit_features", 1, 8),
        Subsection("virtio/virtqueues", 1, 16 * _QUEUE_MAX_7_2),  # avail, used
        Subsection("virtio/ringsize", 1, 4 * _QUEUE_MAX_7_2),  # num_default
        Subsection("virtio/broken", 1, 1),
        Subsection("virtio/extra_state", 1, 0, (
            # dfselect, gfselect, guest_features[2]; per queue: num u16, a byte left
            # unused, enabled u8, desc[2], avail[2], used[2] (be32 each).
            Subsection("virtio_pci/modern_state", 1, 16 + 28 * _QUEUE_MAX_7_2),
        )),
        Subsection("virtio/started", 1, 1),
        Subsection("virtio/disabled", 1, 1),
        # Per queue: last_avail_idx u16, wrap counter u8, used_idx u16, wrap u8, inuse u32.
        Subsection("virtio/packed_virtqueues", 1, 10 * _QUEUE_MAX_7_2),
    ),
)

#: QEMU 10.0 writes a virtio-net-pci device on a tap back end byte for byte as 7.2 does:
#: the same section version (11), PCI, MSI-X, virtio and virtio-net fields, the same
#: subsections with the same versions and sizes, in the same order. Evidence: every
#: capture under tests/data/device-state/10.0/ (QEMU 10.0.2, guest Linux 6.12) walks
#: to its footer with this layout, and the streams of a device paused before any driver
#: equal 7.2's apart from the section id (and, behind a PCI Express port, the Extended
#: Tag bit QEMU 10.0 now sets in the saved config space: a value, not a field).
#: What 10.0 adds is ``virtio-net-device/backend`` (hw/net/virtio-net.c), saved after
#: the RSS subsection only for a vhost-user back end that migrates its own state; its
#: content is that back end's stream, so a section holding it is refused by name. 7.2
#: has no such subsection (its binary carries no such name): a 7.2 reader would refuse
#: the same section at that offset, only by its footer. Newer subsections such as
#: ``virtio/128bit_features`` are not in 10.0.2.
QEMU_10_0 = dataclasses.replace(QEMU_7_2, opaque_subsections=("virtio-net-device/backend",))

#: Layouts by QEMU (major, minor) as ``query-version`` reports it; a stable release
#: (micro) keeps its minor's migration format.
LAYOUTS: dict[tuple[int, int], VirtioNetLayout] = {(7, 2): QEMU_7_2, (10, 0): QEMU_10_0}


def layout_for(version: QemuVersion) -> VirtioNetLayout:
    """The layout QEMU *version* (major, minor, micro) writes; `SnapshotError` if unknown."""
    layout = LAYOUTS.get(version[:2])
    if layout is None:
        known = ", ".join(f"{major}.{minor}" for major, minor in LAYOUTS)
        raise SnapshotError(f"QEMU {'.'.join(map(str, version))}: its device-state layout "
                            f"is not known here (known: {known})")
    return layout
