"""The bed cleans up after failures and reports a guest that never gets ready."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from tests.guest.conftest import RssBed, need_guest
from vnetbackend import tap
from vnetbackend.link_watch import RemovalWatch
from vnetbackend.testbed.guest import (
    BOOT_ATTEMPTS,
    DEFAULT_READY_TIMEOUT,
    GuestBootError,
    GuestOptions,
    GuestStalled,
    boot_guest,
)

pytestmark = [pytest.mark.guest, pytest.mark.asyncio(loop_scope="session")]


class Boom(Exception):
    pass


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_everything_torn_down_when_the_test_body_fails():
    need_guest()
    seen = {}
    with pytest.raises(Boom):
        async with boot_guest(GuestOptions(queues=1)) as guest:
            seen.update(pid=guest.qemu.pid, tap=guest.tap_name, fds=list(guest.queue_fds),
                        run_dir=guest.paths.run_dir)
            assert tap.tap_exists(guest.tap_name)
            flags = await guest.agent.check("cat /sys/class/net/eth0/flags")
            assert int(flags, 16) & 0x1  # IFF_UP
            raise Boom
    assert guest.qemu.returncode is not None
    assert _gone(seen["pid"])
    assert not tap.tap_exists(seen["tap"])
    assert not seen["run_dir"].exists()


CHILD = """
import asyncio
from vnetbackend.testbed.guest import GuestOptions, boot_guest

async def main():
    async with boot_guest(GuestOptions(queues=1)) as guest:
        print(guest.tap_name, guest.qemu.pid, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def _exited(pid: int, timeout: float) -> bool:
    """Whether process *pid* exits within *timeout* (pidfd: readable once it has)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(pidfd, gone.set_result, True)
    try:
        return await asyncio.wait_for(gone, timeout)
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def test_qemu_and_tap_vanish_when_the_test_process_is_killed():
    need_guest()
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD,
                                                 stdout=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(child.stdout.readline(), DEFAULT_READY_TIMEOUT)
        tap_name, qemu_pid = line.decode().split()
        assert tap.tap_exists(tap_name)
        removal = RemovalWatch(tap_name)
    finally:
        child.kill()  # SIGKILL: no cleanup code of the child runs
        await child.wait()
    try:
        assert await _exited(int(qemu_pid), timeout=30)
        await asyncio.wait_for(removal.wait(), 30)
    finally:
        removal.close()
    assert not tap.tap_exists(tap_name)


async def _boot_failure(options: GuestOptions) -> GuestBootError:
    """What booting a guest as *options* say raises; the test fails if it gets ready."""
    with pytest.raises(GuestBootError) as caught:
        async with boot_guest(options):
            pytest.fail("the guest reported ready")
    return caught.value


async def test_guest_that_never_gets_ready_fails_with_its_console():
    need_guest()
    # /bin/cat as init reads the console forever: the kernel boots, the agent never starts.
    options = GuestOptions(queues=1, kernel_args="rdinit=/bin/cat", ready_timeout=25)
    error = await _boot_failure(options)
    assert "not ready within 25 s" in error.reason
    assert "Linux version" in error.console
    assert "Run /bin/cat as init process" in error.console
    assert "Run /bin/cat as init process" in str(error)


async def test_guest_whose_console_goes_silent_is_booted_again_then_fails():
    need_guest()
    # /bin/cat as init: the console goes silent after "Run /bin/cat", like a guest that
    # stopped in early boot. Each boot but the last is announced with its vCPU state.
    # The timeout leaves room for the firmware and the kernel's first lines under TCG.
    options = GuestOptions(queues=1, kernel_args="rdinit=/bin/cat", ready_timeout=120,
                           stall_timeout=10)
    with pytest.warns(GuestStalled) as stalls:
        error = await _boot_failure(options)
    assert len(stalls) == BOOT_ATTEMPTS - 1
    stall = stalls[0].message
    assert isinstance(stall, GuestStalled)
    assert "CPU #0" in stall.vcpus
    assert "Run /bin/cat as init process" in stall.console
    assert f"silent for 10 s before the guest was ready, in each of {BOOT_ATTEMPTS} boots" \
        in error.reason
    assert "Run /bin/cat as init process" in error.console
    assert "CPU #0" in error.reason


async def test_guest_whose_qemu_exits_fails_at_once():
    need_guest()
    # No such init: the kernel panics, panic=-1 reboots and -no-reboot ends QEMU.
    options = GuestOptions(queues=1, kernel_args="rdinit=/no/such/init", ready_timeout=120)
    error = await _boot_failure(options)
    assert "QEMU exited" in error.reason
    assert "Kernel panic" in error.console


async def test_agent_returns_output_and_exit_status(rss_bed: RssBed):
    need_guest()
    agent = rss_bed.guest.agent
    result = await agent.run("echo out; echo err >&2; exit 3")
    assert (result.output, result.status) == ("out\nerr\n", 3)
    result = await agent.run("printf 'no newline'")
    assert (result.output, result.status) == ("no newline", 0)
    release = (await agent.check("uname -r")).strip()
    assert release == agent.kernel_release
