"""QEMU's command-line options for the virtio-net device on a tap, and for monitors.

One place builds them, for the daemon's ``run`` and for the test VM alike, so both give
the device and its tap backend the same ids and switches. The tap's queues are fds QEMU
inherits (``-netdev tap,fds=a:b:..``): QEMU never creates, opens or owns the tap.
Monitors are unix sockets the caller listens on and hands over by fd, so clients can
connect before QEMU is up.
"""

from __future__ import annotations

from collections.abc import Sequence

#: The qdev id of the virtio-net device, and of its tap backend.
DEVICE_ID = "vnet0"
NETDEV_ID = "vnet0-tap"


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
