"""The run directory's rules: its owner and mode, no symlink followed, names checked first."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.prereq import need_root
from vnetbackend.daemon.run_dir import RUN_ROOT, RunDir, RunDirError, default_run_dir
from vnetbackend.errors import VnetError
from vnetbackend.tap import TapError


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_missing_directory_is_created_0700(tmp_path: Path) -> None:
    path = tmp_path / "parent" / "run"
    with RunDir.open(path) as run_dir:
        assert run_dir.path == path
    assert mode_of(path) == 0o700
    assert mode_of(path.parent) == 0o755 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_existing_private_directory_is_taken_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "run"
    path.mkdir(mode=0o755)
    with RunDir.open(path):
        pass
    assert mode_of(path) == 0o755


@pytest.mark.parametrize("mode", [0o770, 0o702, 0o777])
def test_a_directory_others_can_write_to_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "run"
    path.mkdir()
    path.chmod(mode)
    with pytest.raises(RunDirError, match=f"mode {mode:04o} lets group or others write") as err:
        RunDir.open(path)
    assert err.value.path == path and isinstance(err.value, VnetError)


def test_a_directory_of_another_owner_is_refused(tmp_path: Path) -> None:
    need_root()
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    os.chown(path, 65534, 65534)
    with pytest.raises(RunDirError, match=r"owned by uid 65534, not by this daemon's uid 0"):
        RunDir.open(path)


def test_a_symlink_as_the_directory_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "run").symlink_to(elsewhere)
    with pytest.raises(RunDirError, match="is a symlink, not a directory"):
        RunDir.open(tmp_path / "run")


def test_a_file_as_the_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        RunDir.open(tmp_path / "run")


def test_a_symlink_planted_where_a_file_will_be_created_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    with RunDir.open(tmp_path / "run") as run_dir:
        (run_dir.path / "qemu.log").symlink_to(victim)
        (run_dir.path / "qemu-qmp.sock").symlink_to(victim)
        with pytest.raises(RunDirError, match="a symlink is in the way"):
            run_dir.create_file("qemu.log", append=True)
        with pytest.raises(RunDirError, match="a symlink is in the way"):
            run_dir.listen("qemu-qmp.sock")
    assert victim.read_text() == "precious"
    assert (tmp_path / "run" / "qemu.log").is_symlink()


def test_a_dangling_symlink_planted_where_a_file_will_be_created_is_refused(
        tmp_path: Path) -> None:
    target = tmp_path / "would-be-created"
    with RunDir.open(tmp_path / "run") as run_dir:
        (run_dir.path / "qemu.log").symlink_to(target)
        with pytest.raises(RunDirError, match="a symlink is in the way"):
            run_dir.create_file("qemu.log")
    assert not target.exists()


def test_a_stale_file_is_replaced_by_a_new_private_one(tmp_path: Path) -> None:
    with RunDir.open(tmp_path / "run") as run_dir:
        stale = run_dir.path / "qemu.log"
        stale.write_text("old run")
        stale.chmod(0o644)
        with stale.open() as old:  # held open: the new file cannot reuse its inode
            fd = run_dir.create_file("qemu.log", append=True)
            try:
                assert os.fstat(fd).st_ino != os.fstat(old.fileno()).st_ino
                os.write(fd, b"one\n")
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, b"two\n")  # O_APPEND: at the end whatever the offset
            finally:
                os.close(fd)
            assert old.read() == "old run"
        assert stale.read_text() == "one\ntwo\n"
        assert mode_of(stale) == 0o600


def test_sockets_are_0600_and_replace_a_stale_socket(tmp_path: Path) -> None:
    with RunDir.open(tmp_path / "run") as run_dir:
        path = run_dir.path / "qemu-qmp.sock"
        first = run_dir.listen("qemu-qmp.sock")
        first.close()  # a daemon that died leaves its socket file
        second = run_dir.listen("qemu-qmp.sock")
        try:
            assert stat.S_ISSOCK(os.lstat(path).st_mode) and mode_of(path) == 0o600
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))
        finally:
            second.close()


def test_a_directory_in_the_way_is_refused(tmp_path: Path) -> None:
    with RunDir.open(tmp_path / "run") as run_dir:
        (run_dir.path / "qemu.log").mkdir()
        with pytest.raises(RunDirError, match="a directory is in the way"):
            run_dir.create_file("qemu.log")


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".", ""])
def test_names_inside_are_plain_file_names(tmp_path: Path, name: str) -> None:
    with RunDir.open(tmp_path / "run") as run_dir, \
            pytest.raises(RunDirError, match="not a plain file name"):
        run_dir.create_file(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_files_are_reached_through_the_directory_opened_not_its_path(tmp_path: Path) -> None:
    with RunDir.open(tmp_path / "run") as run_dir:
        (tmp_path / "run").rename(tmp_path / "moved")
        (tmp_path / "run").mkdir(mode=0o700)
        os.close(run_dir.create_file("qemu.log"))
    assert (tmp_path / "moved" / "qemu.log").exists()
    assert not (tmp_path / "run" / "qemu.log").exists()


@pytest.mark.parametrize("name", ["../../etc", "..", "a" * 16, "tap/../x", "t p", "t%d", ""])
def test_a_malicious_or_too_long_tap_name_makes_no_path(name: str) -> None:
    with pytest.raises(TapError, match=r"not a valid interface name|must be"):
        default_run_dir(name)


def test_the_default_directory_is_named_after_the_tap() -> None:
    assert default_run_dir("vnb0") == RUN_ROOT / "vnb0"


@pytest.mark.parametrize("command", ["run", "attach"])
def test_the_command_refuses_a_bad_tap_name_before_touching_a_path(command: str) -> None:
    extra = ["--qmp", "/nonexistent"] if command == "attach" else []
    done = subprocess.run([sys.executable, "-m", "vnetbackend.cli", command, "--tap",
                           "../../tmp/x", *extra], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "argument --tap" in done.stderr and "not a valid interface name" in done.stderr


def test_the_command_names_the_rule_a_run_directory_breaks(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o777)
    done = subprocess.run([sys.executable, "-m", "vnetbackend.cli", "attach", "--tap", "vnbx0",
                           "--qmp", "/nonexistent", "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert f"run directory {run_dir}: mode 0777 lets group or others write" in done.stderr
    assert list(run_dir.iterdir()) == []
