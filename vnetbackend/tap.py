"""Persistent multi-queue tap devices with vnet headers, and the fds that are their queues.

A queue is an fd on ``/dev/net/tun`` attached to the device with ``TUNSETIFF``; QEMU
takes such fds (``-netdev tap,fds=a:b:c,vhost=off``). A control queue is a queue that
was detached again at once: it carries no traffic but still accepts
``TUNSETSTEERINGEBPF``, so a daemon can (re)attach a steering program without being
part of the datapath. The program stays on the device when that fd closes.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import socket
import struct
from types import TracebackType

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vnetbackend.errors import VnetError

TUN_DEVICE = "/dev/net/tun"

IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFF_TUN_EXCL = 0x8000
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
#: The flags every queue of our taps is opened with.
QUEUE_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE

TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETPERSIST = 0x400454CB
TUNSETQUEUE = 0x400454D9
TUNSETSTEERINGEBPF = 0x800454E0
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8

IFNAMSIZ = 16

#: Device name each queue fd was opened for; only used to name a vanished device in errors.
_opened_names: dict[int, str] = {}


class TapError(VnetError, OSError):
    """A tap operation failed; the message names the device and the step."""

    def __init__(self, name: str, action: str, err: int, detail: str | None = None) -> None:
        super().__init__(err, f"tap {name!r}: {action}: {detail or os.strerror(err)}")
        self.name = name
        self.action = action


def check_name(name: str) -> bytes:
    """*name* as the kernel's ifr_name bytes; `TapError` (EINVAL) if the kernel would refuse it.

    ``%`` is refused too: the kernel would expand it into a fresh name.
    """
    if not isinstance(name, str):
        raise TapError(repr(name), "check name", errno.EINVAL, "the name must be a str")
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        raise TapError(name, "check name", errno.EINVAL, "the name must be ASCII") from None
    bad = not raw or len(raw) >= IFNAMSIZ or name in (".", "..")
    if bad or any(c in name for c in "/:%") or any(c.isspace() for c in name):
        raise TapError(name, "check name", errno.EINVAL,
                       f"not a valid interface name (1..{IFNAMSIZ - 1} ASCII characters,"
                       " no '/', ':', '%' or whitespace, not '.' or '..')")
    return raw


def _ifreq(raw_name: bytes, flags: int) -> bytes:
    return struct.pack("16sH22x", raw_name, flags)


def _ifindex(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def tap_exists(name: str) -> bool:
    """Whether a network device called *name* exists."""
    check_name(name)
    return _ifindex(name) is not None


def _open_tun(name: str, raw: bytes, flags: int, action: str) -> int:
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise TapError(name, f"{action}: open {TUN_DEVICE}", err.errno or errno.EIO) from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(raw, flags))
    except OSError as err:
        os.close(fd)
        code = err.errno or errno.EIO
        if code == errno.EBUSY and flags & IFF_TUN_EXCL:
            raise TapError(name, action, errno.EEXIST, "a device with this name exists") from None
        if code == errno.EINVAL:
            raise TapError(name, action, code, "the device exists but is not a multi-queue "
                           "vnet_hdr tap (or its queues are all taken)") from None
        raise TapError(name, f"{action}: TUNSETIFF", code) from None
    return fd


def create_tap(name: str) -> None:
    """Create the persistent multi-queue vnet_hdr tap *name* and bring it up.

    Raises `TapError` (EEXIST) if a device of that name exists, EINVAL for a bad name.
    """
    raw = check_name(name)
    if _ifindex(name) is not None:
        raise TapError(name, "create", errno.EEXIST, "a device with this name exists")
    fd = _open_tun(name, raw, QUEUE_FLAGS | IFF_TUN_EXCL, "create")
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError as err:
        raise TapError(name, "create: TUNSETPERSIST", err.errno or errno.EIO) from None
    finally:
        os.close(fd)
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=_require_index(name, "bring up"), state="up")
    except (NetlinkError, TapError) as err:
        delete_tap(name)
        code = err.code if isinstance(err, NetlinkError) else err.errno
        raise TapError(name, "bring up", code or errno.EIO) from None


def _require_index(name: str, action: str) -> int:
    index = _ifindex(name)
    if index is None:
        raise TapError(name, action, errno.ENODEV, "no such device (deleted?)")
    return index


def delete_tap(name: str) -> None:
    """Delete the tap *name*; nothing happens if it is already gone.

    Refuses (EINVAL) to delete a device that is not a tun/tap device.
    """
    check_name(name)
    with IPRoute() as ipr:
        try:
            index = _ifindex(name)
            if index is None:
                return
            links = ipr.link("get", index=index)
            kind = links[0].get(("linkinfo", "kind")) if links else None
            if kind != "tun":
                raise TapError(name, "delete", errno.EINVAL,
                               f"not a tun/tap device (kind {kind!r}); left alone")
            ipr.link("del", index=index)
        except NetlinkError as err:
            if err.code == errno.ENODEV:
                return
            raise TapError(name, "delete", err.code or errno.EIO) from None


def open_queue(name: str) -> int:
    """A new queue fd attached to the existing tap *name* (the caller closes it)."""
    raw = check_name(name)
    index = _require_index(name, "open queue")
    fd = _open_tun(name, raw, QUEUE_FLAGS, "open queue")
    if _ifindex(name) != index:
        # The device vanished before TUNSETIFF, which then made a fresh one: undo that.
        os.close(fd)
        raise TapError(name, "open queue", errno.ENODEV, "the device was deleted meanwhile")
    _opened_names[fd] = name
    return fd


def _queue_ioctl(fd: int, request: int, arg: bytes | array.array[int], action: str,
                 name: str | None = None) -> None:
    try:
        fcntl.ioctl(fd, request, arg)
    except OSError as err:
        code = err.errno or errno.EIO
        detail = "the tap device is gone (deleted)" if code == errno.EBADFD else None
        raise TapError(name or _name_of(fd), action, code, detail) from None


def _int_arg(value: int) -> array.array[int]:
    return array.array("i", [value])


def _name_of(fd: int) -> str:
    """The device name behind queue *fd* for error messages, or the name it was opened for."""
    try:
        ifr = fcntl.ioctl(fd, TUNGETIFF, _ifreq(b"", 0))
        name = ifr[:IFNAMSIZ].split(b"\0", 1)[0].decode("ascii", "replace")
        return f"{name} (fd {fd})"
    except OSError:
        return f"{_opened_names.get(fd, '?')} (fd {fd})"


def open_control_queue(name: str) -> int:
    """A detached queue fd of tap *name*: no traffic, but it can take a steering program."""
    fd = open_queue(name)
    try:
        _queue_ioctl(fd, TUNSETQUEUE, _ifreq(b"", IFF_DETACH_QUEUE), "detach control queue",
                     name)
    except TapError:
        os.close(fd)
        raise
    return fd


def attach_queue(fd: int) -> None:
    """Attach queue *fd* to its tap again if it was detached; an attached queue stays as is.

    Whether a queue is detached belongs to the open file, not to the process that
    detached it: a QEMU that exits leaves the queues its guest had not enabled detached,
    and the next QEMU handed the same fds takes each for attached (QEMU 7.2 and 10.0 abort
    in ``virtio_net_set_queue_pairs`` when they cannot detach one). The kernel answers EINVAL
    to attaching a queue that is attached, and also to one whose tap was deleted, which
    `TUNGETIFF` tells apart.
    """
    try:
        fcntl.ioctl(fd, TUNSETQUEUE, _ifreq(b"", IFF_ATTACH_QUEUE))
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise TapError(_name_of(fd), "attach queue", err.errno or errno.EIO) from None
        _queue_ioctl(fd, TUNGETIFF, _ifreq(b"", 0), "attach queue")


def set_steering_program(fd: int, prog_fd: int) -> None:
    """Attach the socket-filter program *prog_fd* as the tap's steering program.

    *fd* is any queue of the tap (a control queue will do); -1 detaches the program.
    """
    _queue_ioctl(fd, TUNSETSTEERINGEBPF, _int_arg(prog_fd), "set steering program")


def vnet_hdr_size(fd: int) -> int:
    """The size of the virtio-net header that prefixes each frame on queue *fd*."""
    value = array.array("i", [0])
    try:
        fcntl.ioctl(fd, TUNGETVNETHDRSZ, value)
    except OSError as err:
        raise TapError(_name_of(fd), "get vnet header size", err.errno or errno.EIO) from None
    return value[0]


def set_vnet_hdr_size(fd: int, size: int) -> None:
    """Set the virtio-net header size of the tap (10, or 12 for virtio_net_hdr_v1)."""
    _queue_ioctl(fd, TUNSETVNETHDRSZ, _int_arg(size), "set vnet header size")


class TapDevice:
    """A tap that exists for the duration of a ``with`` block and is always deleted after."""

    def __init__(self, name: str) -> None:
        check_name(name)
        self.name = name

    def __enter__(self) -> TapDevice:
        create_tap(self.name)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        delete_tap(self.name)

    def open_queue(self) -> int:
        return open_queue(self.name)

    def open_control_queue(self) -> int:
        return open_control_queue(self.name)
