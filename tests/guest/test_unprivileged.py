"""``vnetbackend run`` against a real guest, with least privilege: QEMU as its own user in
a sandbox, the daemon with only the capabilities it needs, nothing in a shared directory,
and the mirror still following the guest."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.guest.conftest import need_guest
from tests.guest.daemon_bed import (
    RunningDaemon,
    disconnect_after_shutdown,
    run_daemon,
)
from tests.prereq import need
from vnetbackend import tap
from vnetbackend.daemon import launch
from vnetbackend.daemon.privileges import CAP_KILL, CAP_NET_ADMIN, QEMU_USER
from vnetbackend.testbed.bed import wait_mirrored
from vnetbackend.testbed.image import GuestImage, find_guest_image

pytestmark = pytest.mark.guest
KEPT = (1 << CAP_NET_ADMIN) | (1 << CAP_KILL)


def status_of(path: Path) -> dict[str, str]:
    """The fields of a ``/proc/.../status`` file."""
    return {key: value.strip() for key, value in
            (line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)}


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextlib.asynccontextmanager
async def run_private_guest(tmp_path: Path) -> AsyncIterator[RunningDaemon]:
    """``vnetbackend run`` with the test guest, its kernel and initrd copied where only
    root can read them (0600 in a directory of root's, 0700): a QEMU that opened them
    after switching user could not boot."""
    need_guest()
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        need(False, f"needs the user {QEMU_USER} (scripts/setup)")
    image = find_guest_image()
    assert image is not None
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    kernel, initrd = private / "vmlinuz", private / "initrd"
    for source, copy in ((image.kernel, kernel), (image.initrd, initrd)):
        shutil.copyfile(source, copy)
        copy.chmod(0o600)
    async with run_daemon(tmp_path, GuestImage(kernel, initrd), private) as running:
        yield running


async def test_run_confines_qemu_and_the_daemon_and_still_mirrors(tmp_path: Path) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    async with run_private_guest(tmp_path) as running:
        status = await running.status()
        qemu = status_of(Path(f"/proc/{status['qemu-pid']}/status"))
        user = pwd.getpwnam(QEMU_USER)
        assert user.pw_uid != 0 and qemu["Uid"].split() == [str(user.pw_uid)] * 4
        assert qemu["Gid"].split() == [str(user.pw_gid)] * 4
        assert (qemu["CapEff"], qemu["CapPrm"]) == ("0000000000000000",) * 2
        assert (qemu["Seccomp"], qemu["NoNewPrivs"]) == ("2", "1")
        for task in Path(f"/proc/{running.daemon.process.pid}/task").iterdir():
            daemon = status_of(task / "status")
            assert [int(daemon[key], 16) for key in ("CapEff", "CapPrm", "CapBnd")] == [
                KEPT] * 3, f"daemon thread {task.name}"

        await running.rss.set_rxfh(key=bytes(range(13, 53)), equal=2)
        guest_config = await running.rss.read_config()
        status = await wait_mirrored(running.monitor, guest_config)
        assert status["steering"]["attached"] and status["mirror"]["following"] == "trace"
        assert status["mirror"]["last-latency-ms"] is not None
        assert "virtio_net_rss_enable" in (running.run_dir / launch.QEMU_LOG).read_text()

        assert mode_of(running.run_dir) == 0o700
        assert sorted(p.name for p in running.run_dir.iterdir()) == [
            launch.MONITOR_SOCKET, launch.QMP_SOCKET, launch.QEMU_LOG]
        assert mode_of(running.run_dir / launch.QMP_SOCKET) == 0o600
        assert mode_of(running.run_dir / launch.QEMU_LOG) == 0o600

        running.daemon.process.send_signal(signal.SIGTERM)
        code, err = await running.daemon.finish()
        await disconnect_after_shutdown(running.monitor)
        assert code == 0, err
        assert "capabilities kept: CAP_KILL, CAP_NET_ADMIN" in err
        assert not tap.tap_exists(running.tap_name), "deleting the tap needs CAP_NET_ADMIN"
        with pytest.raises(ProcessLookupError):  # signalling QEMU needs CAP_KILL
            os.kill(status["qemu-pid"], 0)
    assert set(os.listdir("/dev/shm")) <= shm_before
