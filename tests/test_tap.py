"""Real multi-queue taps: creation, queues, control queue, errors."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import itertools
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.prereq import need_program, need_tun
from tests.qemu_client import connected
from vnetbackend import tap
from vnetbackend.qemu.command import monitor_args, net_device_args
from vnetbackend.qemu.process import QEMU_BINARY, listen_unix, start_qemu

_serial = itertools.count()


@pytest.fixture
def name() -> Iterator[str]:
    need_tun()
    tap_name = f"vt{os.getpid() % 100000}t{next(_serial)}"
    yield tap_name
    tap.delete_tap(tap_name)


def _link_details(tap_name: str) -> str:
    return subprocess.run(["ip", "-d", "link", "show", "dev", tap_name], check=True,
                          capture_output=True, text=True).stdout


def test_created_tap_is_persistent_multiqueue_vnet_hdr_and_up(name: str) -> None:
    tap.create_tap(name)
    assert tap.tap_exists(name)
    details = _link_details(name)
    assert "type tap" in details
    assert "multi_queue" in details
    assert "vnet_hdr on" in details
    assert "persist on" in details
    assert ",UP" in details


def test_queues_and_control_queue(name: str) -> None:
    tap.create_tap(name)
    fds = [tap.open_queue(name) for _ in range(4)]
    control = tap.open_control_queue(name)
    try:
        details = _link_details(name)
        assert "numqueues 4" in details
        assert "numdisabled 1" in details
        assert tap.vnet_hdr_size(fds[0]) == 10
        tap.set_vnet_hdr_size(fds[0], 12)
        assert tap.vnet_hdr_size(fds[1]) == 12
        # The detached control queue takes the steering ioctl and stays detached.
        tap.set_steering_program(control, -1)
        assert "numqueues 4" in _link_details(name)
        assert "numdisabled 1" in _link_details(name)
    finally:
        for fd in [*fds, control]:
            os.close(fd)


def test_creating_an_existing_tap_fails_and_keeps_it(name: str) -> None:
    tap.create_tap(name)
    with pytest.raises(tap.TapError, match="exists") as caught:
        tap.create_tap(name)
    assert caught.value.errno == errno.EEXIST
    assert name in str(caught.value)
    assert tap.tap_exists(name)


@pytest.mark.parametrize("bad", ["", "x" * 16, "a b", "a/b", "a:b", "t%d", ".", "ñame"])
def test_invalid_names_are_refused(bad: str) -> None:
    with pytest.raises(tap.TapError, match="check name") as caught:
        tap.create_tap(bad)
    assert caught.value.errno == errno.EINVAL


def test_delete_is_idempotent_and_context_manager_cleans_up(name: str) -> None:
    with tap.TapDevice(name) as device:
        fd = device.open_queue()
        os.close(fd)
        assert tap.tap_exists(name)
    assert not tap.tap_exists(name)
    assert tap.delete_tap(name) is None  # deleting what is gone is no error
    assert not tap.tap_exists(name)


def test_context_manager_deletes_on_error(name: str) -> None:
    with pytest.raises(RuntimeError), tap.TapDevice(name):
        raise RuntimeError("boom")
    assert not tap.tap_exists(name)


def test_queues_left_detached_by_an_earlier_user_are_attached_again(name: str) -> None:
    tap.create_tap(name)
    fds = [tap.open_queue(name) for _ in range(4)]
    try:
        for fd in fds[1:3]:  # what a QEMU does for queue pairs its guest has not enabled
            fcntl.ioctl(fd, tap.TUNSETQUEUE, tap._ifreq(b"", tap.IFF_DETACH_QUEUE))
        assert "numdisabled 2" in _link_details(name)
        for fd in fds:
            tap.attach_queue(fd)
        details = _link_details(name)
        assert "numqueues 4" in details
        assert "numdisabled 0" in details
        subprocess.run(["ip", "link", "del", "dev", name], check=True)
        with pytest.raises(tap.TapError, match="gone"):
            tap.attach_queue(fds[0])
    finally:
        for fd in fds:
            os.close(fd)


async def test_the_queues_of_a_qemu_that_exited_take_another_once_attached_again(
        name: str, tmp_path: Path) -> None:
    """QEMU detaches the queues of the pairs its guest has not enabled, and they stay
    detached after it exits; a QEMU handed a detached queue aborts when it cannot detach
    it. Attached again, the same queues serve one QEMU after another."""
    need_program(QEMU_BINARY)
    # pyroute2's synchronous netlink cannot run inside a running event loop.
    await asyncio.to_thread(tap.create_tap, name)
    fds = [await asyncio.to_thread(tap.open_queue, name) for _ in range(4)]
    try:
        for run in ("first", "second"):
            for fd in fds:
                tap.attach_queue(fd)
            socket = tmp_path / f"{run}.sock"
            listener = listen_unix(socket)
            try:
                process = await start_qemu(
                    [QEMU_BINARY, "-machine", "q35", "-accel", "tcg", "-S", "-nodefaults",
                     "-display", "none", *monitor_args("qmp", listener.fileno()),
                     *net_device_args(fds)],
                    pass_fds=(listener.fileno(), *fds), log_path=tmp_path / f"{run}.log",
                    die_with_parent=True)
            finally:
                listener.close()
            async with connected(process, socket) as (_, qmp):
                assert (await qmp.execute("query-status"))["status"] == "prelaunch", run
                # The device's reset left one queue pair enabled.
                assert "numdisabled 3" in _link_details(name), run
    finally:
        for fd in fds:
            os.close(fd)


def test_a_tap_deleted_under_us_gives_clear_errors(name: str) -> None:
    tap.create_tap(name)
    control = tap.open_control_queue(name)
    try:
        subprocess.run(["ip", "link", "del", "dev", name], check=True)
        with pytest.raises(tap.TapError, match="gone") as caught:
            tap.set_steering_program(control, -1)
        assert name in str(caught.value)
        with pytest.raises(tap.TapError, match="no such device") as missing:
            tap.open_queue(name)
        assert missing.value.errno == errno.ENODEV
        assert not tap.tap_exists(name)
    finally:
        os.close(control)


def test_non_tap_devices_are_left_alone() -> None:
    need_tun()
    with pytest.raises(tap.TapError, match="not a tun/tap"):
        tap.delete_tap("lo")
    with pytest.raises(tap.TapError, match="not a multi-queue"):
        tap.open_queue("lo")
    assert tap.tap_exists("lo")
