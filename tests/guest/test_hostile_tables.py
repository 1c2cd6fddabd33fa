"""A guest writes a forged RSS subsection into its VLAN filter; the reader is not fooled.

QEMU keeps one bit per VLAN id (set when the guest's driver sends
VIRTIO_NET_CTRL_VLAN_ADD, i.e. when a VLAN device is created on eth0) and saves those
512 bytes in the virtio-net section, before the real RSS subsection. A guest that picks
its VLAN ids by their bits spells whatever it wants there: here the subsection's name
and a forged body. Each test shows the forgery is real (a search for the name, as the
reader did before it walked the section, meets it) and that the walker returns what
QEMU and the guest hold.

The MAC filter table cannot carry the name from this guest: the stock driver fills it
from the device's address lists, whose unicast entries (macvlan, VLAN devices) must be
valid unicast addresses, i.e. have an even first byte, while every alignment of the
name puts an odd byte at the start of an entry; arbitrary multicast entries need
SIOCADDMULTI (iproute2's ``ip maddr``), which busybox lacks. tests/test_snapshot.py
covers forged MAC tables by rewriting real streams as QEMU would write them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from tests.guest.conftest import need_guest
from tests.prereq import need
from tests.test_snapshot import RSS_MARKER, forged_rss, search_view
from vnetbackend.qemu.command import DEVICE_ID
from vnetbackend.qemu.device import find_net_device
from vnetbackend.qemu.snapshot import DeviceState, read_device_state
from vnetbackend.rss.vectors import MICROSOFT_KEY
from vnetbackend.testbed.ethtool import GuestRss
from vnetbackend.testbed.guest import Guest, GuestOptions, boot_guest
from vnetbackend.testbed.image import guest_dir

pytestmark = [pytest.mark.guest, pytest.mark.asyncio(loop_scope="session")]

QUEUES = 4
VLAN_MODULES = ("llc", "stp", "garp", "mrp", "8021q")
#: Where in the 512-byte filter the forgery goes: past VLAN 0, which 8021q adds itself.
FORGERY_OFFSET = 64
#: A key unlike any the guest uses, with few bits set (each bit is one VLAN device).
FORGED_KEY = b"\x80" * 40
#: Creating a few hundred VLAN devices under TCG takes a while.
PLANT_TIMEOUT = 600.0


#: Planting bytes sets VLAN bits, which needs an empty filter: QEMU 10.0 starts it full
#: (qemu-configs/README.md); its reader meets the same forged streams in test_snapshot.py.
ONLY_WITH_AN_EMPTY_VLAN_FILTER = pytest.mark.qemu_series(
    "7.2", why="QEMU 10.0's VLAN filter starts full: a guest can only clear bits")


def need_vlan_modules() -> None:
    """The guest image carries the VLAN modules (scripts/build-guest's test modules)."""
    need_guest()
    stamp = (guest_dir() / "stamp").read_text().splitlines()
    modules = next((line.split()[1:] for line in stamp if line.startswith("modules ")), [])
    need(set(VLAN_MODULES) <= set(modules),
         "needs the guest image with the VLAN modules (scripts/build-guest)")


def vlan_ids(data: bytes, offset: int = FORGERY_OFFSET) -> list[int]:
    """The VLAN ids whose filter bits spell *data* from byte *offset* on."""
    return [8 * (offset + index) + bit for index, byte in enumerate(data)
            for bit in range(8) if byte >> bit & 1]


async def plant_in_vlan_filter(guest: Guest, data: bytes) -> list[int]:
    """Create a VLAN device on eth0 for each bit of *data*; the ids used."""
    vids = vlan_ids(data)
    assert min(vids) > 0 and max(vids) < 4095
    script = [f"insmod /modules/{module}.ko" for module in VLAN_MODULES]
    script += [f"ip link add link eth0 name v{vid} type vlan id {vid} || exit 1" for vid in vids]
    await guest.agent.check("\n".join(script), timeout=PLANT_TIMEOUT)
    return vids


async def device_state(guest: Guest, tmp_path: Path) -> tuple[bytes, DeviceState, dict]:
    """Snapshot over the guest's QMP socket: (stream, walked state, QEMU's rx filter)."""
    qmp = QMPClient("hostile-tables")
    await qmp.connect(str(guest.qmp_socket))
    try:
        device = await find_net_device(qmp, DEVICE_ID)
        version = (await qmp.execute("query-version"))["qemu"]
        path = tmp_path / "state.bin"
        await qmp.execute("xen-save-devices-state", {"filename": str(path), "live": False})
        rx_filter = next(nic for nic in await qmp.execute("query-rx-filter")
                         if nic["name"] == DEVICE_ID)
    finally:
        await qmp.disconnect()
    stream = path.read_bytes()
    state = read_device_state(stream, device.pci_address,
                              (version["major"], version["minor"], version["micro"]),
                              guest.queues)
    return stream, state, rx_filter


def tap_queues(guest: Guest) -> int:
    """Queues attached to the guest's tap now: QEMU keeps one per active pair."""
    return sum(entry.startswith("tx-")
               for entry in os.listdir(f"/sys/class/net/{guest.tap_name}/queues"))


@ONLY_WITH_AN_EMPTY_VLAN_FILTER
async def test_a_forged_version_in_the_vlan_filter_does_not_freeze_the_reader(tmp_path):
    need_vlan_modules()
    async with boot_guest(GuestOptions(queues=QUEUES)) as guest:
        rss = GuestRss(guest.agent)
        await rss.enable_rxhash()
        await rss.set_rxfh(MICROSOFT_KEY, equal=QUEUES)
        vids = await plant_in_vlan_filter(guest, forged_rss(FORGED_KEY, version=0xDEAD))
        stream, state, rx_filter = await device_state(guest, tmp_path)
        config = await rss.read_config()
        pairs = tap_queues(guest)
    assert set(vids) <= set(rx_filter["vlan-table"])
    assert stream.count(RSS_MARKER) == 2  # the forgery, then QEMU's own subsection
    with pytest.raises(ValueError, match="version 57005"):
        search_view(stream)  # a reader that searches would refuse this and every later one
    assert state.rss is not None and state.rss.redirect
    assert state.rss.key == config.key == MICROSOFT_KEY
    assert state.rss.indirection_table == config.indirection_table
    assert state.rss.hash_types == config.hash_types
    assert state.curr_queue_pairs == pairs == QUEUES
    assert state.mac == guest.mac


@ONLY_WITH_AN_EMPTY_VLAN_FILTER
async def test_a_forged_subsection_in_the_vlan_filter_does_not_switch_rss_on(tmp_path):
    need_vlan_modules()
    async with boot_guest(GuestOptions(queues=QUEUES, rss=False, hash_report=False)) as guest:
        vids = await plant_in_vlan_filter(guest, forged_rss(FORGED_KEY))
        stream, state, rx_filter = await device_state(guest, tmp_path)
        ethtool_x = await guest.agent.check("ethtool -x eth0")
        pairs = tap_queues(guest)
    assert set(vids) <= set(rx_filter["vlan-table"])
    assert stream.count(RSS_MARKER) == 1  # the forgery; QEMU holds no RSS subsection
    forged = search_view(stream)
    assert forged is not None and forged.key == FORGED_KEY
    forged.to_config(queues=QUEUES)  # a searching reader would have mirrored this
    # The guest has no RSS to show (ethtool: "Operation not supported"), nor does QEMU.
    assert ethtool_x.split("RSS hash key:")[1].split()[:3] == ["Operation", "not", "supported"]
    assert state.rss is None
    assert state.curr_queue_pairs == pairs == QUEUES
    assert state.mac == guest.mac
