"""Reading the guest's RSS state out of QEMU's device-state stream."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from qemu.qmp import QMPClient

from tests.prereq import need_program
from vnetbackend.qemu.snapshot import (
    RSS_SUBSECTION,
    RssState,
    SnapshotError,
    device_rss_state,
    parse_snapshot,
)
from vnetbackend.rss import InvalidRssConfig
from vnetbackend.rss.vectors import MICROSOFT_KEY


def section(name: str, body: bytes, section_id: int = 7) -> bytes:
    raw = name.encode()
    return (struct.pack(">BIB", 0x04, section_id, len(raw)) + raw + struct.pack(">II", 0, 11)
            + body + struct.pack(">BI", 0x7E, section_id))


def rss_subsection(table: list[int], *, enabled: int = 1, redirect: int = 1, populate: int = 1,
                   hash_types: int = 0x3F, default_queue: int = 0,
                   key: bytes = MICROSOFT_KEY, version: int = 1) -> bytes:
    return (bytes([0x05, len(RSS_SUBSECTION)]) + RSS_SUBSECTION
            + struct.pack(">IBBBIHH", version, enabled, redirect, populate, hash_types,
                          len(table), default_queue)
            + key + struct.pack(f">{len(table)}H", *table))


def stream(*sections: bytes) -> bytes:
    return b"QEVM" + struct.pack(">I", 3) + b"".join(sections) + b"\x00"


DEVICE_BODY = bytes(range(64))  # stands in for the device's other fields


def test_rss_subsection_is_read() -> None:
    data = stream(section("timer", bytes(16), 1),
                  section("0000:00:02.0/virtio-net", DEVICE_BODY + rss_subsection(
                      [0, 1, 1, 0], default_queue=1)))
    state = device_rss_state(data)
    assert state == RssState(True, True, True, 0x3F, 1, MICROSOFT_KEY, (0, 1, 1, 0))
    config = state.to_config(queues=2)
    assert config.indirection_table == (0, 1, 1, 0) and config.unclassified_queue == 1


def test_absent_subsection_means_rss_off() -> None:
    data = stream(section("0000:00:02.0/virtio-net", DEVICE_BODY))
    assert parse_snapshot(data) == {"0000:00:02.0/virtio-net": None}


def test_two_devices_are_told_apart() -> None:
    data = stream(section("0000:00:02.0/virtio-net", DEVICE_BODY, 3),
                  section("0000:00:03.0/virtio-net", DEVICE_BODY + rss_subsection([1]), 4))
    assert device_rss_state(data, "0000:00:02.0") is None
    assert device_rss_state(data, "0000:00:03.0").indirection_table == (1,)
    with pytest.raises(SnapshotError, match="expected one virtio-net device"):
        device_rss_state(data)
    with pytest.raises(SnapshotError, match=r"0000:00:09\.0"):
        device_rss_state(data, "0000:00:09.0")


def test_hash_only_configuration_steers_to_the_default_queue() -> None:
    data = stream(section("0000:00:02.0/virtio-net",
                          rss_subsection([], redirect=0, default_queue=2)))
    config = device_rss_state(data).to_config(queues=4)
    assert config.indirection_table == (2,)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"table": [0, 1, 2]}, "indirection_table"),
    ({"table": [0, 9]}, "indirection_table[1]"),
    ({"table": [0], "hash_types": 0x400}, "hash_types"),
    ({"table": [0], "default_queue": 5}, "unclassified_queue"),
])
def test_out_of_spec_state_is_refused_by_name(kwargs: dict, field: str) -> None:
    data = stream(section("0000:00:02.0/virtio-net", rss_subsection(**kwargs)))
    with pytest.raises(InvalidRssConfig) as caught:
        device_rss_state(data).to_config(queues=2)
    assert caught.value.field == field


@pytest.mark.parametrize(("data", "message"), [
    (b"", "QEVM"),
    (b"ELF\x7f", "QEVM"),
    (stream(section("0000:00:02.0/virtio-net", rss_subsection([0, 1], version=2))), "version"),
    (stream(section("0000:00:02.0/virtio-net", rss_subsection([0, 1], enabled=7))), "enabled"),
    (stream(rss_subsection([0])), "outside a virtio-net section"),
])
def test_malformed_streams_raise_snapshot_error(data: bytes, message: str) -> None:
    with pytest.raises(SnapshotError, match=message):
        device_rss_state(data)


VALID = stream(section("0000:00:02.0/virtio-net", DEVICE_BODY + rss_subsection(list(range(8)))))


@given(cut=st.integers(min_value=0, max_value=len(VALID)))
def test_every_truncation_is_read_or_refused_cleanly(cut: int) -> None:
    with contextlib.suppress(SnapshotError):
        parse_snapshot(VALID[:cut])


@given(data=st.binary(max_size=300), at=st.integers(min_value=0, max_value=len(VALID)))
def test_arbitrary_bytes_inside_a_stream_never_crash(data: bytes, at: int) -> None:
    with contextlib.suppress(SnapshotError):
        parse_snapshot(VALID[:at] + data + VALID[at:])


async def _device_state_of_fresh_qemu(tmp_path: Path) -> bytes:
    """Start QEMU as a QMP client of ours, save its device state, and stop it."""
    qmp_path, out = tmp_path / "qmp.sock", tmp_path / "state.bin"
    client = QMPClient("snapshot-test")
    await client.start_server(str(qmp_path))
    qemu = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-m", "64", "-S", "-nodefaults",
        "-display", "none", "-netdev", "user,id=n0",
        "-device", "virtio-net-pci,netdev=n0,mq=on,rss=on,addr=05.0",
        "-qmp", f"unix:{qmp_path},server=off",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.wait_for(client.accept(), 30)
        await client.execute("xen-save-devices-state", {"filename": str(out), "live": False})
    finally:
        await client.disconnect()
        qemu.kill()
        await qemu.wait()
    return out.read_bytes()


def test_real_qemu_stream_has_the_device_and_no_rss_before_a_driver(tmp_path: Path) -> None:
    need_program("qemu-system-x86_64")
    data = asyncio.run(_device_state_of_fresh_qemu(tmp_path))
    assert parse_snapshot(data) == {"0000:00:05.0/virtio-net": None}
