"""``vnetbackend run`` against a real guest, with least privilege: QEMU as its own user in
a sandbox, the daemon with only the capabilities it needs, nothing in a shared directory,
and the mirror still following the guest."""

from __future__ import annotations

import asyncio
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
from tests.guest.test_daemon import (
    READY_TIMEOUT,
    DaemonProcess,
    RunningDaemon,
    disconnect_after_shutdown,
    wait_mirrored,
)
from tests.prereq import need, need_bcc
from vnetbackend import tap
from vnetbackend.daemon import launch
from vnetbackend.daemon.privileges import CAP_KILL, CAP_NET_ADMIN, QEMU_USER
from vnetbackend.qemu.process import listen_unix
from vnetbackend.testbed.agent import GuestAgent
from vnetbackend.testbed.ethtool import GuestRss
from vnetbackend.testbed.guest import unique_tap_name
from vnetbackend.testbed.image import find_guest_image
from vnetbackend.testbed.vm import guest_args

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
    need_bcc()
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
    name = unique_tap_name()
    run_dir = tmp_path / "run"
    agent_path = tmp_path / "agent.sock"
    agent_listener = listen_unix(agent_path)
    fd = agent_listener.fileno()
    daemon = await DaemonProcess.start(
        "run", "--tap", name, "--queues", "2", "--run-dir", str(run_dir), "--pass-fd", str(fd),
        "--", *guest_args(kernel, initrd, append="console=ttyS0 panic=-1",
                          console_log=private / "console.log", agent_fd=fd),
        pass_fds=(fd,))
    agent_listener.close()
    qemu_pid = None
    agent = None
    try:
        agent = await GuestAgent.connect(agent_path)
        await asyncio.wait_for(agent.wait_ready(), READY_TIMEOUT)
        monitor = await daemon.monitor(run_dir / launch.MONITOR_SOCKET)
        running = RunningDaemon(daemon, name, run_dir, GuestRss(agent), monitor)
        qemu_pid = (await running.status())["qemu-pid"]
        yield running
    finally:
        if agent is not None:
            await agent.close()
        await daemon.kill()
        if qemu_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(qemu_pid, signal.SIGKILL)
        await asyncio.to_thread(tap.delete_tap, name)


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
