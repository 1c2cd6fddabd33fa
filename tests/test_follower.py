"""Following QEMU's RSS trace events in a file that grows."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from vnetbackend.qemu.follower import TraceFollower, parse_trace_line


def test_trace_lines_are_parsed() -> None:
    enable = parse_trace_line(
        "4242@1700000000.012345:virtio_net_rss_enable hashes 0x3f, table of 128, key of 40\n")
    assert enable is not None
    assert (enable.kind, enable.hash_types, enable.table_length, enable.key_length) == (
        "enable", 0x3F, 128, 40)
    assert enable.at == 1700000000.012345
    disable = parse_trace_line("virtio_net_rss_disable ")
    assert disable is not None and (disable.kind, disable.at) == ("disable", None)
    error = parse_trace_line("1@2.000003:virtio_net_rss_error Invalid key size, value 0x00000050")
    assert error is not None and error.detail == "Invalid key size, value 0x00000050"
    assert parse_trace_line("1@2.000003:virtio_net_announce_timer") is None
    assert parse_trace_line("garbage \x00\xff") is None


def test_qemu_10_trace_lines_are_parsed() -> None:
    """Lines as QEMU 10.0.2 wrote them (-trace 'virtio_net_rss_*'): it names the device
    first, and adds events of its own eBPF RSS, which are not RSS commits."""
    enable = parse_trace_line(
        "virtio_net_rss_enable nic=0x5572b631ab90 hashes 0x3f, table of 128, key of 40")
    assert enable is not None
    assert (enable.kind, enable.hash_types, enable.table_length, enable.key_length) == (
        "enable", 0x3F, 128, 40)
    assert parse_trace_line("virtio_net_rss_attach_ebpf nic=0x5572b6307850 prog-fd=-1") is None
    assert parse_trace_line("virtio_net_rss_load nic=0x5572b631ab90 nfds=0 fds=(nil)") is None


async def test_follower_yields_lines_as_they_are_appended(tmp_path: Path) -> None:
    log = tmp_path / "trace.log"
    log.write_text("1@1.000001:virtio_net_rss_disable \n")
    async with TraceFollower(log) as follower:
        events = aiter(follower)
        with log.open("a") as out:
            out.write("noise from another event\n1@5.000002:virtio_net_rss_en")
            out.flush()
            out.write("able hashes 0x7, table of 4, key of 40\n")
            out.flush()
            first = await asyncio.wait_for(anext(events), 5)
            out.write("1@6.000000:virtio_net_rss_disable \n")
            out.flush()
            second = await asyncio.wait_for(anext(events), 5)
    assert (first.kind, first.hash_types, first.table_length, first.at) == (
        "enable", 0x7, 4, 5.000002)
    assert second.kind == "disable"


async def test_follower_can_replay_from_the_start(tmp_path: Path) -> None:
    log = tmp_path / "trace.log"
    log.write_text("1@1.000001:virtio_net_rss_disable \n")
    async with TraceFollower(log, from_start=True) as follower:
        event = await asyncio.wait_for(anext(aiter(follower)), 5)
    assert event.at == 1.000001


async def test_a_fully_read_log_past_its_bound_is_cut_back(tmp_path: Path) -> None:
    log = tmp_path / "trace.log"
    log.write_bytes(b"")
    line = "1@5.000002:virtio_net_rss_enable hashes 0x3f, table of 128, key of 40\n"
    async with TraceFollower(log, max_bytes=3 * len(line)) as follower:
        events = aiter(follower)
        with log.open("a") as out:  # O_APPEND, as QEMU writes the log
            out.write(line * 4)
            out.flush()
            kinds = [(await asyncio.wait_for(anext(events), 5)).kind for _ in range(5)]
            assert kinds == ["enable"] * 4 + ["truncated"]
            assert log.stat().st_size == 0
            out.write("1@6.000000:virtio_net_rss_disable \n")
            out.flush()
            after = await asyncio.wait_for(anext(events), 5)
    assert (after.kind, after.at) == ("disable", 6.0)
    assert log.stat().st_size == len("1@6.000000:virtio_net_rss_disable \n")


async def test_a_symlink_in_place_of_the_log_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("1@1.000001:virtio_net_rss_disable \n")
    log = tmp_path / "trace.log"
    log.symlink_to(target)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        async with TraceFollower(log):
            pass
