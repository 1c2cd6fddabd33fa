"""Reading a virtio-net device's state out of QEMU's device-state stream.

The streams under ``tests/data/device-state/`` were written by QEMU 7.2 (see
``scripts/capture-device-state``); what each is compared with comes from beside it, not
from the stream: the guest's ethtool answers, QEMU's ``virtio_net_rss_*`` trace events
and ``query-rx-filter`` reply, and the tap queues attached on the host. The hostile
cases rewrite only bytes a guest chooses (its MAC and VLAN filters), found through
QEMU's own ``query-rx-filter`` reply, and build streams as QEMU would have written them
had the guest set those filters.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qemu.qmp import QMPClient

from tests.prereq import need_program
from vnetbackend.qemu.snapshot import DeviceState, RssState, SnapshotError, read_device_state
from vnetbackend.rss import InvalidRssConfig
from vnetbackend.rss.vectors import MICROSOFT_KEY
from vnetbackend.testbed.ethtool import (
    FLOW_TYPES,
    hash_types_from_flows,
    parse_flow_hash_fields,
    parse_rxfh,
)

DATA = Path(__file__).parent / "data" / "device-state"
CAPTURES = sorted(path.name.removesuffix(".json") for path in DATA.glob("*.json"))
DEVICE_ID = "vnet0"
RSS_MARKER = b"\x05\x15virtio-net-device/rss"
VLAN_BYTES = 512
MAC_TABLE_ENTRIES = 64
_TRACE_ENABLE = re.compile(r"virtio_net_rss_enable hashes (0x[0-9a-f]+), table of (\d+), "
                           r"key of (\d+)")


@dataclass(frozen=True, slots=True)
class Capture:
    """One stored stream and the evidence captured with it."""

    name: str
    meta: dict
    stream: bytes

    @property
    def version(self) -> tuple[int, int, int]:
        major, minor, micro = self.meta["qemu_version"]
        return major, minor, micro

    def read(self, stream: bytes | None = None) -> DeviceState:
        return read_device_state(self.stream if stream is None else stream,
                                 self.meta["pci_address"], self.version,
                                 self.meta["max_queue_pairs"])

    @property
    def rx_filter(self) -> dict:
        return next(nic for nic in self.meta["rx_filter"] if nic["name"] == DEVICE_ID)

    def answer(self, command: str) -> str:
        return self.meta["guest"]["answers"][command]["output"]


@functools.cache
def capture(name: str) -> Capture:
    meta = json.loads((DATA / f"{name}.json").read_text())
    return Capture(name, meta, gzip.decompress((DATA / f"{name}.state.gz").read_bytes()))


def mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def guest_key(ethtool_x: str) -> bytes | None:
    """The key the guest's ``ethtool -x`` shows, None when it has none."""
    lines = ethtool_x.splitlines()
    shown = lines[lines.index("RSS hash key:") + 1].strip()
    return None if shown == "Operation not supported" else bytes.fromhex(shown.replace(":", ""))


def guest_hash_types(cap: Capture) -> int:
    return int(hash_types_from_flows({flow: parse_flow_hash_fields(
        cap.answer(f"ethtool -n eth0 rx-flow-hash {flow}")) for flow in FLOW_TYPES}))


def qemu_rss_enabled(cap: Capture) -> re.Match[str] | None:
    """QEMU's last RSS trace event when it enabled RSS (hashes, table, key), else None."""
    events = cap.meta["trace"]
    return _TRACE_ENABLE.fullmatch(events[-1]) if events else None


@dataclass(frozen=True, slots=True)
class Section:
    """Where the capture's device section is: its header, just past its name, its end."""

    start: int
    body: int
    end: int


def locate_section(cap: Capture) -> Section:
    """The section by its header (``0x04``, id, name) and footer (``0x7e``, same id)."""
    name = cap.meta["pci_address"].encode() + b"/virtio-net"
    assert cap.stream.count(bytes([len(name)]) + name) == 1
    start = cap.stream.index(bytes([len(name)]) + name) - 5
    footer = b"\x7e" + cap.stream[start + 1 : start + 5]
    return Section(start, start + 6 + len(name), cap.stream.index(footer, start) + 5)


def test_captures_cover_the_cases() -> None:
    assert len(CAPTURES) >= 12
    assert {capture(name).version[:2] for name in CAPTURES} == {(7, 2)}


# --- real streams against the evidence ------------------------------------------------


@pytest.mark.parametrize("name", CAPTURES)
def test_rss_is_present_exactly_when_qemu_last_enabled_it(name: str) -> None:
    cap = capture(name)
    assert (cap.read().rss is not None) == (qemu_rss_enabled(cap) is not None)


@pytest.mark.parametrize("name", [n for n in CAPTURES if qemu_rss_enabled(capture(n))])
def test_rss_state_is_the_guests(name: str) -> None:
    cap = capture(name)
    rss = cap.read().rss
    assert rss is not None
    hashes, table_len, key_len = qemu_rss_enabled(cap).groups()
    ethtool_x = cap.answer("ethtool -x eth0")
    assert rss.enabled and rss.populate_hash
    assert rss.key == guest_key(ethtool_x)
    assert len(rss.key) == int(key_len)
    assert rss.hash_types == guest_hash_types(cap) == int(hashes, 16)
    assert len(rss.indirection_table) == int(table_len)
    assert rss.default_queue == 0  # Linux's virtio_net never sets another
    if cap.meta["offered"]["rss"]:
        assert rss.redirect
        assert rss.indirection_table == parse_rxfh(ethtool_x).table
    else:  # hash reports only: the guest cannot ask for steering
        assert not rss.redirect


def test_the_guests_own_view_can_differ_from_qemus() -> None:
    # Right after boot the driver shows a table and key it has not sent yet; with RSS
    # not offered it has none at all. QEMU holds no RSS in either case.
    booted, not_offered = capture("booted"), capture("rss-not-offered")
    assert parse_rxfh(booted.answer("ethtool -x eth0")).table
    assert guest_key(not_offered.answer("ethtool -x eth0")) is None
    assert booted.read().rss is None and not_offered.read().rss is None


@pytest.mark.parametrize("name", CAPTURES)
def test_queue_pairs_are_the_tap_queues_qemu_keeps_and_the_mac_is_the_devices(
        name: str) -> None:
    cap = capture(name)
    state = cap.read()
    assert state.curr_queue_pairs == cap.meta["tap_queues"]
    assert state.mac == mac_bytes(cap.rx_filter["main-mac"])


def test_qemu_serves_the_pairs_it_was_told_not_those_the_guest_uses() -> None:
    # Linux 6.1 names its probe-time pair count in RSS commands after ethtool -L.
    cap = capture("channels-2-rss-again")
    assert "Combined:\t2" in cap.answer("ethtool -l eth0").split("Current")[1]
    assert cap.read().curr_queue_pairs == 4 == cap.meta["tap_queues"]


def test_devices_are_told_apart_by_address() -> None:
    cap = capture("bare-two-devices")
    other = cap.meta["other_devices"][0]
    first = cap.read()
    second = read_device_state(cap.stream, other["pci_address"], cap.version,
                               other["max_queue_pairs"])
    assert first.mac == mac_bytes(cap.rx_filter["main-mac"])
    assert second.mac == mac_bytes(other["mac"])
    with pytest.raises(SnapshotError, match=r"0000:00:09\.0/virtio-net: no such device"):
        read_device_state(cap.stream, "0000:00:09.0", cap.version, 1)


def test_hash_only_configuration_steers_to_the_default_queue() -> None:
    rss = capture("hash-only").read().rss
    assert rss is not None
    assert rss.to_config(queues=4).indirection_table == (rss.default_queue,)


# --- what the caller must know --------------------------------------------------------


@pytest.mark.parametrize("version", [(10, 0, 2), (7, 1, 0), (8, 2, 1)])
def test_an_unknown_qemu_version_is_refused_by_name(version: tuple[int, int, int]) -> None:
    with pytest.raises(SnapshotError, match=rf"QEMU {'.'.join(map(str, version))}: .* not "
                                            r"known here \(known: 7\.2\)"):
        read_device_state(capture("rss-equal-4").stream, "0000:00:01.0", version, 4)


@pytest.mark.parametrize("pairs", [1, 2, 5])
def test_a_wrong_queue_pair_count_is_refused(pairs: int) -> None:
    cap = capture("rss-equal-4")  # 4 pairs: 9 queues
    with pytest.raises(SnapshotError, match=f"has 3 or {2 * pairs + 1}") as caught:
        read_device_state(cap.stream, cap.meta["pci_address"], cap.version, pairs)
    assert caught.value.field == "virtio queue count" and caught.value.offset is not None


@pytest.mark.parametrize("data", [b"", b"ELF\x7f", b"QEVM\x00\x00\x00\x02"])
def test_a_stream_that_is_not_qemus_is_refused(data: bytes) -> None:
    with pytest.raises(SnapshotError, match="no QEVM header") as caught:
        read_device_state(data, "0000:00:01.0", (7, 2, 22), 4)
    assert caught.value.offset == 0


# --- hostile filters --------------------------------------------------------------------


def vlan_bitmap(vids: list[int]) -> bytes:
    """QEMU's VLAN filter as saved: bit (vid % 8) of byte (vid // 8)."""
    bitmap = bytearray(VLAN_BYTES)
    for vid in vids:
        bitmap[vid >> 3] |= 1 << (vid & 7)
    return bytes(bitmap)


@dataclass(frozen=True, slots=True)
class Filters:
    """Where a stream holds the MAC table (be32 entries, then 6 bytes each) and VLANs."""

    start: int
    entries: int

    @property
    def end(self) -> int:
        return self.start + 4 + 6 * self.entries + VLAN_BYTES


def locate_filters(cap: Capture) -> Filters:
    """The filters, found by the bytes QEMU's ``query-rx-filter`` reply says they hold.

    QEMU saves unicast entries, then multicast ones, each in the order the guest set
    them (the reply lists them the other way round), then the VLAN bitmap.
    """
    rx = cap.rx_filter
    macs = [*reversed(rx["unicast-table"]), *reversed(rx["multicast-table"])]
    saved = (struct.pack(">I", len(macs)) + b"".join(map(mac_bytes, macs))
             + vlan_bitmap(rx["vlan-table"]))
    assert cap.stream.count(saved) == 1
    return Filters(cap.stream.index(saved), len(macs))


def with_filters(cap: Capture, table: bytes, vlans: bytes | None = None) -> bytes:
    """The stream QEMU writes after the guest set MAC *table* (and VLAN bitmap *vlans*)."""
    where = locate_filters(cap)
    vlans = cap.stream[where.end - VLAN_BYTES : where.end] if vlans is None else vlans
    return (cap.stream[: where.start] + struct.pack(">I", len(table) // 6) + table + vlans
            + cap.stream[where.end :])


def forged_rss(key: bytes, *, version: int = 1, table: tuple[int, ...] = (0,)) -> bytes:
    return (RSS_MARKER + struct.pack(">IBBBIHH", version, 1, 1, 1, 0x3F, len(table), 0)
            + key + struct.pack(f">{len(table)}H", *table))


def padded_table(data: bytes) -> bytes:
    return data + bytes(-len(data) % 6)


def search_view(stream: bytes) -> RssState | None:
    """What a reader searching for the subsection's name finds: the last match.

    This is how the reader worked before it walked the section, and what a guest that
    plants the name in its filters aims at. Raises `ValueError` on a version it does
    not know, as that reader did.
    """
    found = None
    start = 0
    while (hit := stream.find(RSS_MARKER, start)) >= 0:
        start = hit + 1
        pos = hit + len(RSS_MARKER)
        version, enabled, redirect, populate, hash_types, size, default = struct.unpack_from(
            ">IBBBIHH", stream, pos)
        if version != 1:
            raise ValueError(f"RSS subsection version {version}")
        pos += 15
        key = stream[pos : pos + 40]
        table = struct.unpack_from(f">{size}H", stream, pos + 40)
        found = RssState(bool(enabled), bool(redirect), bool(populate), hash_types, default,
                         key, table)
    return found


FORGED_KEY = bytes(range(0xA0, 0xC8))


def test_the_filters_are_where_qemus_rx_filter_reply_says() -> None:
    cap = capture("filters")
    where = locate_filters(cap)
    rx = cap.rx_filter
    assert where.entries == len(rx["unicast-table"]) + len(rx["multicast-table"]) == 10
    assert sorted(rx["vlan-table"]) == [0, 5, 9, 100, 4094]


def test_a_forged_subsection_in_the_vlan_filter_is_data() -> None:
    cap = capture("filters")
    stream = with_filters(cap, b"", (bytes(64) + forged_rss(FORGED_KEY)).ljust(VLAN_BYTES,
                                                                               b"\0"))
    state = cap.read(stream)
    assert state == cap.read()
    assert state.rss is not None and state.rss.key == guest_key(cap.answer("ethtool -x eth0"))
    # The search meets the forgery first, and takes the real one only because QEMU
    # saves it later; with RSS off it would take the forgery (next test).
    assert stream.find(RSS_MARKER) < stream.rfind(RSS_MARKER)


@pytest.mark.parametrize("name", ["booted", "channels-2", "rss-not-offered"])
def test_a_forged_subsection_in_the_mac_table_does_not_switch_rss_on(name: str) -> None:
    cap = capture(name)
    stream = with_filters(cap, padded_table(forged_rss(FORGED_KEY)))
    forged = search_view(stream)
    assert forged is not None and forged.key == FORGED_KEY
    forged.to_config(queues=4)  # a configuration the search would have mirrored
    assert cap.read(stream).rss is None


@pytest.mark.parametrize("place", ["mac table", "vlan filter"])
def test_a_forged_version_does_not_freeze_the_reader(place: str) -> None:
    cap = capture("rss-weights")
    forgery = forged_rss(FORGED_KEY, version=0xDEAD)
    if place == "mac table":
        stream = with_filters(cap, padded_table(forgery))
    else:
        stream = with_filters(cap, b"", forgery.ljust(VLAN_BYTES, b"\0"))
    with pytest.raises(ValueError, match="version 57005"):
        search_view(stream)
    assert cap.read(stream) == cap.read()


def test_a_forged_section_header_in_the_filters_is_not_a_section() -> None:
    cap = capture("rss-equal-4")
    section = locate_section(cap)
    header = cap.stream[section.start : section.body + 8]  # through instance and version
    footer = b"\x7e" + header[1:5]
    fake = footer + header + forged_rss(FORGED_KEY)
    stream = with_filters(cap, padded_table(fake), fake.ljust(VLAN_BYTES, b"\0"))
    assert stream.count(header) == 3
    assert cap.read(stream) == cap.read()


def test_a_full_mac_table_is_read_through() -> None:
    cap = capture("rss-equal-4")
    stream = with_filters(cap, bytes(range(256)) + bytes(range(128)))
    assert cap.read(stream) == cap.read()


def test_more_entries_than_fit_are_zeros_as_qemu_saves_them() -> None:
    cap = capture("rss-equal-4")
    entries = MAC_TABLE_ENTRIES + 1
    assert cap.read(with_filters(cap, bytes(6 * entries))) == cap.read()
    stream = with_filters(cap, padded_table(forged_rss(FORGED_KEY)).ljust(6 * entries, b"\0"))
    with pytest.raises(SnapshotError, match="65 entries do not fit in 64") as caught:
        cap.read(stream)
    assert caught.value.field == "mac_table.macs"
    assert caught.value.offset == locate_filters(cap).start + 4


@settings(max_examples=60, deadline=None)
@given(table=st.lists(st.binary(min_size=6, max_size=6), max_size=MAC_TABLE_ENTRIES),
       vlans=st.binary(min_size=VLAN_BYTES, max_size=VLAN_BYTES))
def test_whatever_the_guest_puts_in_its_filters_the_state_is_the_same(
        table: list[bytes], vlans: bytes) -> None:
    cap = capture("filters")
    assert cap.read(with_filters(cap, b"".join(table), vlans)) == cap.read()


def test_two_complete_sections_for_one_device_are_refused() -> None:
    cap = capture("rss-equal-4")
    section = locate_section(cap)
    doubled = (cap.stream[: section.end] + cap.stream[section.start : section.end]
               + cap.stream[section.end :])
    with pytest.raises(SnapshotError, match="all walk to a footer; refusing to pick one"):
        cap.read(doubled)


# --- malformed streams ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["filters", "bare-pcie"])
def test_every_truncation_of_the_section_is_refused_with_its_offset(name: str) -> None:
    cap = capture(name)
    section = locate_section(cap)
    for cut in range(section.body, section.end + 1):
        with pytest.raises(SnapshotError) as caught:
            cap.read(cap.stream[:cut])
        assert caught.value.offset is not None and caught.value.offset <= cut, cut


def test_every_corrupted_byte_is_read_or_refused_cleanly() -> None:
    cap = capture("filters")
    section, filters, real = locate_section(cap), locate_filters(cap), cap.read()
    stream = bytearray(cap.stream)
    refused = 0
    for at in range(section.body, section.end):
        stream[at] ^= 0xFF
        try:
            state = cap.read(bytes(stream))
        except SnapshotError as err:
            assert err.offset is not None
            refused += 1
        else:
            if filters.start + 4 <= at < filters.end:  # the guest's own bytes
                assert state == real, at
        stream[at] ^= 0xFF
    assert refused > 0


def _rss_subsection(cap: Capture) -> int:
    assert cap.stream.count(RSS_MARKER) == 1
    return cap.stream.index(RSS_MARKER)


def _msix_control(cap: Capture) -> int:
    """Offset of the MSI-X message control word in the saved PCI config space."""
    config = locate_section(cap).body + 8 + 4  # instance, version, PCIDevice.version_id
    pointer = cap.stream[config + 0x34]
    while cap.stream[config + pointer] != 0x11:
        pointer = cap.stream[config + pointer + 1]
    return config + pointer + 2


def _corrupt(cap: Capture, at: int, value: bytes) -> bytes:
    return cap.stream[:at] + value + cap.stream[at + len(value) :]


@pytest.mark.parametrize(("where", "value", "field"), [
    (lambda c: locate_filters(c).start, b"\xff\xff\xff\xff", "mac_table.macs"),
    (lambda c: _rss_subsection(c) + 23, b"\x00\x00\x00\x02", "virtio-net-device/rss version"),
    (lambda c: _rss_subsection(c) + 23 + 11, b"\x00\x81",
     "virtio-net-device/rss indirections_len"),
    (lambda c: _rss_subsection(c) + 23 + 4, b"\x02", "virtio-net-device/rss enabled"),
    (lambda c: locate_section(c).body + 4, b"\x00\x00\x00\x0c", "section version"),
    (lambda c: locate_section(c).body + 8, b"\x00\x00\x00\x03", "PCIDevice.version_id"),
    (lambda c: locate_filters(c).end + 11, b"\x00\x03", "max_queue_pairs"),
    (lambda c: locate_filters(c).end + 13, b"\x00\x05", "curr_queue_pairs"),
    (lambda c: locate_filters(c).end + 13, b"\x00\x00", "curr_queue_pairs"),
    (_msix_control, b"\x0f", None),  # a wrong vector count shifts what follows
])
def test_corrupted_fields_are_refused_by_name_and_offset(where, value: bytes,
                                                         field: str | None) -> None:
    cap = capture("filters")
    with pytest.raises(SnapshotError) as caught:
        cap.read(_corrupt(cap, where(cap), value))
    assert caught.value.field == field or field is None
    assert caught.value.offset is not None
    assert f"at offset {caught.value.offset}" in str(caught.value)
    assert "QEMU 7.2.22" in str(caught.value)


# --- validation of what is read -----------------------------------------------------------


@pytest.mark.parametrize(("table", "changes", "field"), [
    ((0, 1, 2), {}, "indirection_table"),
    ((0, 9), {}, "indirection_table[1]"),
    ((0,), {"hash_types": 0x400}, "hash_types"),
    ((0,), {"default_queue": 5}, "unclassified_queue"),
])
def test_out_of_spec_state_is_refused_by_name(table: tuple[int, ...], changes: dict,
                                              field: str) -> None:
    values = {"hash_types": 0x3F, "default_queue": 0} | changes
    state = RssState(True, True, True, values["hash_types"], values["default_queue"],
                     MICROSOFT_KEY, table)
    with pytest.raises(InvalidRssConfig) as caught:
        state.to_config(queues=2)
    assert caught.value.field == field


# --- the QEMU on this machine ---------------------------------------------------------------


async def _device_state_of_fresh_qemu(tmp_path: Path) -> tuple[bytes, tuple[int, int, int]]:
    """Start QEMU as a QMP client of ours, save its device state, and stop it."""
    qmp_path, out = tmp_path / "qmp.sock", tmp_path / "state.bin"
    client = QMPClient("snapshot-test")
    await client.start_server(str(qmp_path))
    qemu = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-m", "64", "-S", "-nodefaults",
        "-display", "none", "-netdev", "user,id=n0",
        "-device", "virtio-net-pci,netdev=n0,mq=on,rss=on,addr=05.0,mac=52:54:00:12:34:56",
        "-qmp", f"unix:{qmp_path},server=off",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.wait_for(client.accept(), 30)
        await client.execute("xen-save-devices-state", {"filename": str(out), "live": False})
        version = (await client.execute("query-version"))["qemu"]
    finally:
        await client.disconnect()
        qemu.kill()
        await qemu.wait()
    return out.read_bytes(), (version["major"], version["minor"], version["micro"])


def test_this_machines_qemu_before_a_driver(tmp_path: Path) -> None:
    need_program("qemu-system-x86_64")
    data, version = asyncio.run(_device_state_of_fresh_qemu(tmp_path))
    state = read_device_state(data, "0000:00:05.0", version, max_queue_pairs=1)
    assert state == DeviceState(rss=None, curr_queue_pairs=1, mac=mac_bytes("52:54:00:12:34:56"))
