"""One virtio-net device of a running QEMU, seen through QMP: where it is, its RSS state."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import QMPClient

from vnetbackend.errors import VnetError
from vnetbackend.qemu.snapshot import RssState, device_rss_state


class DeviceNotFound(VnetError, LookupError):
    """QEMU has no virtio-net PCI device with the requested id."""

VIRTIO_NET = "virtio-net"


@dataclass(frozen=True, slots=True)
class NetDevice:
    """Where QMP finds a virtio-net PCI device: its qdev id, PCI address, virtio path."""

    qdev_id: str
    pci_address: str

    @property
    def virtio_path(self) -> str:
        """The QOM path the ``x-query-virtio-*`` commands take."""
        return f"/machine/peripheral/{self.qdev_id}/virtio-backend"


async def find_net_device(qmp: QMPClient, qdev_id: str) -> NetDevice:
    """Locate the virtio-net device *qdev_id* on the root PCI bus.

    Raises `DeviceNotFound` unless QEMU lists a PCI device with that id and a virtio-net
    device at its virtio path.
    """
    for bus in await qmp.execute("query-pci"):
        for dev in bus["devices"]:
            if dev.get("qdev_id") == qdev_id:
                address = f"0000:{bus['bus']:02x}:{dev['slot']:02x}.{dev['function']}"
                device = NetDevice(qdev_id, address)
                break
        else:
            continue
        break
    else:
        raise DeviceNotFound(f"no PCI device with id {qdev_id!r} in QEMU")
    virtio = {d["path"]: d["name"] for d in await qmp.execute("x-query-virtio")}
    if virtio.get(device.virtio_path) != VIRTIO_NET:
        found = virtio.get(device.virtio_path, "no virtio device")
        raise DeviceNotFound(f"PCI device {qdev_id!r} is not virtio-net ({found} at "
                             f"{device.virtio_path})")
    return device


async def read_rss_state(qmp: QMPClient, device: NetDevice) -> RssState | None:
    """The device's RSS state now (None while RSS is off); pauses the VM for milliseconds.

    Raises `vnetbackend.qemu.snapshot.SnapshotError` when the saved state cannot be read.
    """
    fd, name = tempfile.mkstemp(prefix="vnetbackend-state-", dir=_scratch_dir())
    os.close(fd)
    path = Path(name)
    try:
        await qmp.execute("xen-save-devices-state", {"filename": str(path), "live": False})
        # Read in place: ~90 KB from a memory-backed file takes microseconds, while the
        # three thread-pool hops of an async read cost ~1 ms on the mirror's path.
        stream = path.read_bytes()
    finally:
        path.unlink(missing_ok=True)
    return device_rss_state(stream, device.pci_address)


def _scratch_dir() -> str | None:
    """A memory-backed directory when there is one: the snapshot is on the mirror's path."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
