"""Privileges: the user QEMU runs as, and the capabilities the daemon keeps once set up.

The daemon starts as root with every capability: it creates the tap, loads the steering
program and starts QEMU. After that it needs only a few (`RUNNING_CAPABILITIES`), and
`drop_capabilities` gives up the rest for good: from the effective, permitted,
inheritable and ambient sets and from the bounding set, with ``no_new_privs`` set so that
no later exec can gain any back.

Capabilities belong to threads, not to processes: `drop_capabilities` changes the calling
thread only, so it refuses while the process has other threads. Threads started after it
inherit the reduced sets.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pwd
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from vnetbackend.errors import VnetError

#: The system user `scripts/setup` creates for QEMU: no login shell, no home.
QEMU_USER = "vnetbackend-qemu"

CAP_KILL = 5
CAP_NET_ADMIN = 12
#: Linux's capability names by number (``include/uapi/linux/capability.h``).
CAPABILITY_NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
#: What the daemon of ``run`` still does that needs a capability, measured on Linux 6.18:
#: deleting its tap at exit (RTM_DELLINK: CAP_NET_ADMIN) and signalling a QEMU that runs
#: as another user (SIGTERM, then SIGKILL: CAP_KILL). Map reads and writes, the report
#: ring and TUNSETSTEERINGEBPF on the control queue work through fds opened before the
#: drop and need none.
RUNNING_CAPABILITIES = frozenset({CAP_NET_ADMIN, CAP_KILL})
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_PERFMON = 38
CAP_BPF = 39
#: What ``serve`` keeps: everything adding, serving and removing a VM does, measured on
#: Linux 6.18 (tests/guest/test_serve.py runs it with exactly these): creating, opening
#: and deleting taps (CAP_NET_ADMIN), creating maps and loading the program (CAP_BPF; and
#: CAP_PERFMON, without which the verifier treats the loader as unprivileged and refuses
#: the program's pointer arithmetic on map values), signalling QEMU (CAP_KILL), and
#: starting a confined QEMU: setpriv narrows its bounding set (CAP_SETPCAP) and QEMU
#: switches user (CAP_SETUID, CAP_SETGID, which it can only have if the daemon has them).
SERVE_CAPABILITIES = frozenset({CAP_NET_ADMIN, CAP_BPF, CAP_PERFMON, CAP_KILL, CAP_SETPCAP,
                                CAP_SETUID, CAP_SETGID})

#: How long `drop_capabilities` waits for other threads to end.
THREAD_EXIT_WAIT_S = 1.0
_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAPABILITY_VERSION_3 = 0x20080522
_CAP_LAST_CAP = Path("/proc/sys/kernel/cap_last_cap")


class PrivilegeError(VnetError, OSError):
    """A privilege change failed; ``step`` names it and ``value`` what it was applied to."""

    def __init__(self, step: str, value: object, err: int, detail: str | None = None) -> None:
        super().__init__(err, f"{step} ({value}): {detail or os.strerror(err)}")
        self.step = step
        self.value = value


@dataclass(frozen=True, slots=True)
class QemuUser:
    """The unprivileged user QEMU switches to once it has opened what it opens at startup."""

    name: str
    uid: int
    gid: int


def qemu_user(name: str) -> QemuUser:
    """The user *name*; `PrivilegeError` if it does not exist or is root (uid or gid 0)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError("look up the QEMU user", name, errno.ENOENT,
                             "no such user (scripts/setup creates "
                             f"{QEMU_USER!r}; --qemu-user picks another)") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise PrivilegeError("look up the QEMU user", name, errno.EPERM,
                             f"uid {entry.pw_uid}, gid {entry.pw_gid}: QEMU would keep root")
    return QemuUser(name, entry.pw_uid, entry.pw_gid)


@dataclass(frozen=True, slots=True)
class CapabilitySets:
    """A thread's capability sets as masks (bit n is capability n)."""

    effective: int
    permitted: int
    bounding: int

    def view(self) -> dict[str, list[str]]:
        """The sets by capability name, for logs and monitors."""
        return {"effective": capability_names(self.effective),
                "permitted": capability_names(self.permitted),
                "bounding": capability_names(self.bounding)}


def capability_names(mask: int) -> list[str]:
    """The names of the capabilities in *mask* (``CAP_<n>`` for ones this table lacks)."""
    return [CAPABILITY_NAMES[n] if n < len(CAPABILITY_NAMES) else f"CAP_{n}"
            for n in range(mask.bit_length()) if mask >> n & 1]


def capability_sets(status: Path = Path("/proc/thread-self/status")) -> CapabilitySets:
    """The sets ``CapEff``, ``CapPrm`` and ``CapBnd`` of a ``/proc/.../status`` file."""
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines()
                  if ":" in line)
    return CapabilitySets(*(int(fields[key], 16) for key in ("CapEff", "CapPrm", "CapBnd")))


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32))


_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int, step: str, value: object) -> int:
    result: int = _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0),
                              ctypes.c_ulong(0), ctypes.c_ulong(0))
    if result < 0:
        raise PrivilegeError(step, value, ctypes.get_errno())
    return result


def _wait_for_one_thread() -> None:
    """Return once this process has one thread; `PrivilegeError` naming the others if it
    still has more after `THREAD_EXIT_WAIT_S` (a joined Python thread leaves the kernel
    a moment after its join returns)."""
    deadline = time.monotonic() + THREAD_EXIT_WAIT_S
    while len(threads := os.listdir("/proc/self/task")) > 1:
        if time.monotonic() > deadline:
            names = []
            for tid in threads:
                with contextlib.suppress(FileNotFoundError):
                    names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
            raise PrivilegeError("drop capabilities", f"threads {', '.join(names)}",
                                 errno.EBUSY, "capabilities are per thread: every other "
                                 "thread would keep its own")
        time.sleep(0.001)


def drop_capabilities(keep: Collection[int]) -> CapabilitySets:
    """Keep only the capabilities *keep* (numbers), in every set, for good; the sets after.

    Raises `PrivilegeError` when the process keeps more than one thread (the others would
    keep everything) or when the kernel refuses a step (dropping from the bounding set
    needs CAP_SETPCAP, so it comes first).
    """
    _wait_for_one_thread()
    last = int(_CAP_LAST_CAP.read_text())
    mask = 0
    for cap in keep:
        if not 0 <= cap <= last:
            raise PrivilegeError("drop capabilities", f"capability {cap}", errno.EINVAL,
                                 f"not a capability of this kernel (0..{last})")
        mask |= 1 << cap
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs", 1)
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, "clear the ambient set", "all")
    for cap in range(last + 1):
        if not mask >> cap & 1 and _prctl(_PR_CAPBSET_READ, cap, "read the bounding set",
                                          cap):
            _prctl(_PR_CAPBSET_DROP, cap, "drop from the bounding set",
                   capability_names(1 << cap)[0])
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for word in range(2):
        data[word].effective = data[word].permitted = (mask >> (32 * word)) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(header), data) < 0:
        raise PrivilegeError("capset", capability_names(mask), ctypes.get_errno())
    return capability_sets()
