"""QEMU's command-line options for the virtio-net device on a tap, and for monitors.

One place builds them, for the daemon's ``run`` and for the test VM alike, so both give
the device and its tap backend the same ids and switches. The tap's queues are fds QEMU
inherits (``-netdev tap,fds=a:b:..``): QEMU never creates, opens or owns the tap.
Monitors are unix sockets the caller listens on and hands over by fd, so clients can
connect before QEMU is up. `unprivileged_args` has QEMU give up root once it has opened
what it opens at startup, and confine itself with seccomp.
"""

from __future__ import annotations

from collections.abc import Sequence

#: The qdev id of the virtio-net device, and of its tap backend.
DEVICE_ID = "vnet0"
NETDEV_ID = "vnet0-tap"
#: The first QEMU version with ``-run-with user=``, which replaces ``-runas``.
RUN_WITH_USER_SINCE = (9, 1)


def option(kind: str, **values: object) -> str:
    """A QEMU option string ``kind,key=value,...``; booleans become on/off and
    underscores in keys become dashes."""
    parts = [kind]
    for key, value in values.items():
        if isinstance(value, bool):
            value = "on" if value else "off"
        parts.append(f"{key.replace('_', '-')}={value}")
    return ",".join(parts)


def net_device_args(queue_fds: Sequence[int], *, mac: str | None = None, rss: bool = True,
                    hash_report: bool = True, mq: bool = True) -> list[str]:
    """The tap backend on *queue_fds* (one per queue pair) and the virtio-net device on it,
    with RSS and hash reports offered unless switched off."""
    device: dict[str, object] = {"id": DEVICE_ID, "netdev": NETDEV_ID}
    if mac is not None:
        device["mac"] = mac
    device.update(mq=mq, rss=rss, hash=hash_report, vectors=2 * len(queue_fds) + 2)
    return [
        "-netdev", option("tap", id=NETDEV_ID, fds=":".join(map(str, queue_fds)), vhost=False),
        "-device", option("virtio-net-pci", **device),
    ]


def socket_chardev_args(chardev_id: str, listening_fd: int) -> list[str]:
    """A ``-chardev`` on a unix socket the caller already listens on."""
    return ["-chardev", option("socket", id=chardev_id, fd=listening_fd, server=True,
                               wait=False)]


def monitor_args(chardev_id: str, listening_fd: int) -> list[str]:
    """A QMP monitor on a unix socket the caller already listens on."""
    return [*socket_chardev_args(chardev_id, listening_fd),
            "-mon", f"chardev={chardev_id},mode=control"]


def unprivileged_args(user: str, version: tuple[int, int, int]) -> list[str]:
    """QEMU (of *version*) switches to *user* after startup and runs in a seccomp sandbox.

    The switch happens after QEMU has opened what its command line names (``-kernel``,
    ``-initrd``, ``-chardev file``, ...) and before the guest runs; it sets every uid and gid,
    so the kernel clears QEMU's capabilities. The sandbox denies spawning processes and
    changing scheduling or resource limits, besides QEMU's default (obsolete calls).

    It allows set*uid/set*gid (``elevateprivileges=allow``): QEMU loads its seccomp filter
    before it switches user, so with ``elevateprivileges=deny`` (or ``children``, which
    also denies) its own setgid() is killed with SIGSYS ("Bad system call") at startup,
    as tried on 7.2.22 (``-runas``) and 10.0.2 (``-run-with user=``). After the switch
    those calls can only move among the user's own ids: no capabilities are left, and
    loading the filter set no_new_privs.
    """
    if version[:2] >= RUN_WITH_USER_SINCE:
        switch = ["-run-with", f"user={user.replace(',', ',,')}"]
    else:
        switch = ["-runas", user]
    return [*switch, "-sandbox", option("on", elevateprivileges="allow", spawn="deny",
                                        resourcecontrol="deny")]
