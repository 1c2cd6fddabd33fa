"""Privileges: QEMU confined and unprivileged, the snapshot through a handed-over fd, and
the daemon's own capabilities dropped (seen in /proc/PID/status of real processes)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from tests.prereq import need, need_program, need_root
from tests.qemu_client import connected
from vnetbackend.daemon.privileges import (
    CAP_KILL,
    CAP_NET_ADMIN,
    QEMU_USER,
    PrivilegeError,
    capability_names,
    qemu_user,
)
from vnetbackend.qemu.command import monitor_args, unprivileged_args
from vnetbackend.qemu.device import STATE_FILE_NAME, DeviceStateReader, query_qemu_version
from vnetbackend.qemu.process import (
    QEMU_BINARY,
    QemuVersionUnknown,
    listen_unix,
    qemu_version,
    start_confined_qemu,
    stop_process,
)
from vnetbackend.qemu.qmp import QemuCallFailed, call

KEPT = (1 << CAP_NET_ADMIN) | (1 << CAP_KILL)


def status_of(pid: int | str) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict((key, value.strip()) for key, value in
                (line.split(":", 1) for line in text.splitlines() if ":" in line))


def need_qemu_user() -> None:
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        need(False, f"needs the user {QEMU_USER} (scripts/setup)")


# -- QEMU's user and sandbox --------------------------------------------------------------


def test_the_user_switch_follows_the_qemu_version() -> None:
    sandbox = ["-sandbox", "on,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"]
    assert unprivileged_args("qemu", (7, 2, 22)) == ["-runas", "qemu", *sandbox]
    assert unprivileged_args("qemu", (9, 0, 4)) == ["-runas", "qemu", *sandbox]
    assert unprivileged_args("qemu", (9, 1, 0)) == ["-run-with", "user=qemu", *sandbox]
    assert unprivileged_args("a,b", (10, 0, 2))[:2] == ["-run-with", "user=a,,b"]


async def test_the_installed_qemu_says_its_version() -> None:
    need_program(QEMU_BINARY)
    major, minor, _ = await qemu_version()
    assert (major, minor) >= (7, 2)
    with pytest.raises(QemuVersionUnknown, match="no-such-qemu --version"):
        await qemu_version("no-such-qemu")
    with pytest.raises(QemuVersionUnknown, match="said"):
        await qemu_version("true")


def test_the_qemu_user_must_exist_and_not_be_root() -> None:
    with pytest.raises(PrivilegeError, match=r"no-such-user.*no such user") as err:
        qemu_user("no-such-user")
    assert err.value.value == "no-such-user"
    with pytest.raises(PrivilegeError, match="QEMU would keep root"):
        qemu_user("root")


@contextlib.asynccontextmanager
async def confined_qemu(tmp_path: Path, *extra: str,
                        ) -> AsyncIterator[tuple[asyncio.subprocess.Process, QMPClient]]:
    """QEMU with no machine, started as `vnetbackend run` starts it: switched to the QEMU
    user, sandboxed, its log on an fd; *extra* options go before the switch."""
    need_root()
    need_program(QEMU_BINARY)
    need_qemu_user()
    args = unprivileged_args(qemu_user(QEMU_USER).name, await qemu_version())
    listener = listen_unix(tmp_path / "qmp.sock")
    log_fd = os.open(tmp_path / "qemu.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        process = await start_confined_qemu(
            [QEMU_BINARY, "-machine", "none", "-nodefaults", "-display", "none",
             *monitor_args("qmp", listener.fileno()), *extra, *args],
            pass_fds=(listener.fileno(),), log_fd=log_fd)
    finally:
        listener.close()
        os.close(log_fd)
    async with connected(process, tmp_path / "qmp.sock") as running:
        yield running


async def test_qemu_runs_as_its_user_without_capabilities_in_a_sandbox(tmp_path: Path) -> None:
    # tmp_path is root's and 0700: only a QEMU that is still root can create a file there.
    console = tmp_path / "console.log"
    async with confined_qemu(tmp_path, "-chardev", f"file,id=console,path={console}") as (
            process, qmp):
        await call(qmp, "query-status")
        status = status_of(process.pid)
        user = pwd.getpwnam(QEMU_USER)
        assert status["Uid"].split() == [str(user.pw_uid)] * 4
        assert status["Gid"].split() == [str(user.pw_gid)] * 4
        assert (status["CapEff"], status["CapPrm"], status["CapInh"], status["CapAmb"]) == (
            "0000000000000000",) * 4
        assert capability_names(int(status["CapBnd"], 16)) == ["CAP_SETGID", "CAP_SETUID"]
        assert (status["Seccomp"], status["NoNewPrivs"]) == ("2", "1")
        assert console.exists() and console.stat().st_uid == 0


async def test_qemu_cannot_deny_set_id_calls_and_switch_user() -> None:
    """Why `unprivileged_args` allows set*id calls: QEMU (7.2, 10.0) loads its seccomp filter
    before it switches user, so denying them kills it at its own setgid(). Should a QEMU
    switch first, this fails, and ``elevateprivileges=deny`` can be had."""
    need_root()
    need_program(QEMU_BINARY)
    need_qemu_user()
    args = unprivileged_args(QEMU_USER, await qemu_version())
    args[-1] = args[-1].replace("elevateprivileges=allow", "elevateprivileges=deny")
    qemu = await asyncio.create_subprocess_exec(
        QEMU_BINARY, "-machine", "none", "-nodefaults", "-display", "none", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        status = await asyncio.wait_for(qemu.wait(), 30)
    finally:
        await stop_process(qemu, 1.0)
    assert status == -signal.SIGSYS


# -- the device-state snapshot through an fd ----------------------------------------------


async def test_snapshots_go_through_the_handed_over_file(tmp_path: Path) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    async with confined_qemu(tmp_path) as (process, qmp):
        async with DeviceStateReader(qmp, await query_qemu_version(qmp), 1) as reader:
            fdsets = await call(qmp, "query-fdsets")
            assert [fd["opaque"] for s in fdsets for fd in s["fds"]] == [STATE_FILE_NAME]
            held = {os.readlink(f"/proc/{process.pid}/fd/{fd}")
                    for fd in os.listdir(f"/proc/{process.pid}/fd")}
            assert f"/memfd:{STATE_FILE_NAME} (deleted)" in held
            streams = [await reader.snapshot() for _ in range(3)]
        # Each starts the file afresh: at offset 0 (the magic) and no longer than the first
        # (only a clock in the stream differs).
        assert all(s.startswith(b"QEVM") for s in streams)
        assert {len(s) for s in streams} == {len(streams[0])} and len(streams[0]) > 8
        assert await call(qmp, "query-fdsets") == [], "leaving takes the file back"
        with pytest.raises(QemuCallFailed, match="QEMU holds no file"):
            await reader.snapshot()
    assert set(os.listdir("/dev/shm")) <= shm_before


async def test_a_reader_qemu_cannot_take_is_a_failed_call(tmp_path: Path) -> None:
    async with confined_qemu(tmp_path) as (_, qmp):
        pass
    with pytest.raises(QemuCallFailed, match="add-fd"):
        async with DeviceStateReader(qmp, (7, 2, 0), 1):
            pass
    fds = set(os.listdir("/proc/self/fd"))
    assert not any(STATE_FILE_NAME in os.readlink(f"/proc/self/fd/{fd}")
                   for fd in fds if os.path.exists(f"/proc/self/fd/{fd}"))


# -- the daemon's capabilities ------------------------------------------------------------


def in_child(code: str) -> subprocess.CompletedProcess[str]:
    """Run *code* in a fresh Python (cwd: the repository), its output as text."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).parents[1])


def test_a_drop_leaves_only_the_kept_capabilities_in_every_set() -> None:
    need_root()
    done = in_child("""
        from vnetbackend.daemon.privileges import (
            CAP_KILL, CAP_NET_ADMIN, drop_capabilities)
        sets = drop_capabilities({CAP_NET_ADMIN, CAP_KILL})
        print(sets.view())
        print(open("/proc/self/status").read())
    """)
    assert done.returncode == 0, done.stderr
    status = dict(line.split(":\t", 1) for line in done.stdout.splitlines() if ":\t" in line)
    assert [int(status[key], 16) for key in ("CapEff", "CapPrm", "CapBnd")] == [KEPT] * 3
    assert (int(status["CapInh"], 16), int(status["CapAmb"], 16)) == (0, 0)
    assert status["NoNewPrivs"] == "1"
    assert done.stdout.splitlines()[0] == str({key: ["CAP_KILL", "CAP_NET_ADMIN"] for key in
                                               ("effective", "permitted", "bounding")})


def test_what_was_dropped_is_refused_and_what_was_kept_works(tmp_path: Path) -> None:
    need_root()
    victim = subprocess.Popen(["setpriv", "--reuid", "65534", "--regid", "65534",
                               "--clear-groups", "sleep", "60"])
    owned = tmp_path / "owned"
    owned.write_text("")
    try:
        done = in_child(f"""
            import os, signal
            from vnetbackend.daemon.privileges import CAP_KILL, drop_capabilities
            drop_capabilities({{CAP_KILL}})
            try:
                os.chown({str(owned)!r}, 65534, 65534)
            except PermissionError:
                print("chown refused")
            os.kill({victim.pid}, signal.SIGTERM)
            print("signalled")
        """)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split("\n")[:2] == ["chown refused", "signalled"]
        assert victim.wait(10) == -signal.SIGTERM
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


def test_a_drop_with_other_threads_is_refused_and_changes_nothing() -> None:
    need_root()
    done = in_child("""
        import threading
        from vnetbackend.daemon import privileges
        privileges.THREAD_EXIT_WAIT_S = 0.05
        release = threading.Event()
        worker = threading.Thread(target=release.wait)
        worker.start()
        try:
            privileges.drop_capabilities(())
        except privileges.PrivilegeError as err:
            print(err)
        release.set()
        worker.join()
        print(open("/proc/self/status").read())
    """)
    assert done.returncode == 0, done.stderr
    assert "drop capabilities (threads " in done.stdout
    assert "capabilities are per thread" in done.stdout
    status = dict(line.split(":\t", 1) for line in done.stdout.splitlines() if ":\t" in line)
    assert int(status["CapEff"], 16) == int(status_of("self")["CapEff"], 16)
