"""The capabilities ``serve`` keeps are each needed to add a VM, and together enough.

A child process drops to `SERVE_CAPABILITIES`, or to that set less one capability, and
then does what adding and removing a VM does: create, open and delete a tap; load the
steering program from its compiled image; start a process confined as QEMU is (setpriv
narrowing its bounding set) that switches to another user; signal a process of another
user. The expectation for each missing capability is the kernel's documented rule
(capabilities(7), and the verifier's CAP_PERFMON rule for pointer arithmetic).
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.prereq import need_bcc, need_program, need_tun
from vnetbackend.daemon.privileges import (
    CAP_BPF,
    CAP_KILL,
    CAP_NET_ADMIN,
    CAP_PERFMON,
    CAP_SETGID,
    CAP_SETPCAP,
    CAP_SETUID,
    SERVE_CAPABILITIES,
    capability_names,
)
from vnetbackend.steering.instances import ProgramSource

STEPS = ("tap", "program", "confined-user-switch", "signal")
#: Which step each capability is for, by the kernel's rules.
NEEDED_FOR = {
    CAP_NET_ADMIN: "tap",
    CAP_BPF: "program",
    CAP_PERFMON: "program",
    CAP_SETPCAP: "confined-user-switch",
    CAP_SETUID: "confined-user-switch",
    CAP_SETGID: "confined-user-switch",
    CAP_KILL: "signal",
}
NOBODY = 65534

CHILD = """
    import os, pickle, signal, subprocess, sys
    from vnetbackend import tap
    from vnetbackend.daemon.privileges import drop_capabilities
    from vnetbackend.daemon.privileges import CAP_SETGID, CAP_SETUID
    from vnetbackend.qemu.process import SETPRIV, SWITCH_USER_CAPABILITIES
    SWITCH_MASK = 1 << CAP_SETUID | 1 << CAP_SETGID

    image = pickle.loads(open(sys.argv[1], "rb").read())
    keep, tap_name, victim = eval(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    drop_capabilities(keep)

    def step(name, action):
        try:
            action()
        except Exception as err:
            print(name, "refused", type(err).__name__, str(err).splitlines()[0])
        else:
            print(name, "ok")

    def tap_step():
        tap.create_tap(tap_name)
        try:
            os.close(tap.open_control_queue(tap_name))
        finally:
            tap.delete_tap(tap_name)

    def program_step():
        image.load().close()

    def confined_step():
        # As start_confined_qemu starts QEMU: only the user switch in the bounding set
        # (setpriv leaves the set as it is, silently, where it may not change it).
        bounding = ",".join(["-all", *(f"+{c}" for c in SWITCH_USER_CAPABILITIES)])
        confined = subprocess.run(
            [SETPRIV, f"--bounding-set={bounding}", "--inh-caps=-all", "--no-new-privs",
             "--", "sh", "-c", "grep CapBnd /proc/self/status && exec " + SETPRIV +
             " --reuid 65534 --regid 65534 --clear-groups id -u"],
            check=True, capture_output=True, text=True)
        bound, uid = confined.stdout.split()[1:3]
        if int(bound, 16) != SWITCH_MASK:
            raise PermissionError(f"bounding set {bound}, not the user switch alone")
        if uid != "65534":
            raise PermissionError(f"switched to uid {uid}")

    step("tap", tap_step)
    step("program", program_step)
    step("confined-user-switch", confined_step)
    step("signal", lambda: os.kill(victim, signal.SIGTERM))
"""


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_bcc()
    need_tun()
    need_program("setpriv")
    path = tmp_path_factory.mktemp("image") / "image.pickle"
    path.write_bytes(pickle.dumps(ProgramSource().compile()))
    return path


def _steps_with(keep: frozenset[int], image_file: Path, name: str) -> dict[str, str]:
    victim = subprocess.Popen(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                               "--clear-groups", "sleep", "60"])
    try:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(CHILD), str(image_file),
             repr(set(keep)), name, str(victim.pid)],
            capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1])
    finally:
        victim.kill()
        victim.wait()
    assert done.returncode == 0, done.stderr
    results = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert list(results) == list(STEPS), done.stdout
    return results


def test_the_kept_set_is_enough_to_add_a_vm(image_file: Path) -> None:
    results = _steps_with(SERVE_CAPABILITIES, image_file, "vbcapall")
    assert results == dict.fromkeys(STEPS, "ok")


def test_the_kept_set_names_each_capability_once() -> None:
    assert set(NEEDED_FOR) == set(SERVE_CAPABILITIES)


@pytest.mark.parametrize("missing", sorted(SERVE_CAPABILITIES),
                         ids=lambda cap: capability_names(1 << cap)[0])
def test_each_kept_capability_is_needed(missing: int, image_file: Path) -> None:
    results = _steps_with(SERVE_CAPABILITIES - {missing}, image_file, f"vbcap{missing}")
    refused = {step for step, outcome in results.items() if outcome != "ok"}
    assert refused == {NEEDED_FOR[missing]}, results
