"""One virtio-net device of a running QEMU, seen through QMP: where it is, its RSS state."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from types import TracebackType

from qemu.qmp import EventListener, QMPClient, QMPError
from qemu.qmp.message import Message

from vnetbackend.errors import VnetError
from vnetbackend.filewatch import FileWatch
from vnetbackend.qemu.qmp import QemuCallFailed, QemuReplyError, call, reply_field
from vnetbackend.qemu.snapshot import DeviceState, SnapshotError, read_device_state


class DeviceNotFound(VnetError, LookupError):
    """QEMU has no virtio-net PCI device with the requested id."""

VIRTIO_NET = "virtio-net"
#: The name of the snapshot's memory file (``/proc/PID/fd`` shows ``/memfd:NAME``), and
#: the note on its QMP fd set.
STATE_FILE_NAME = "vnetbackend-device-state"
#: A device-state stream larger than this is refused (a virtio-net guest's: ~90 KB).
MAX_STATE_BYTES = 16 << 20
#: How far QEMU's event times may stray outside the daemon's own before and after a
#: snapshot (both read the same wall clock; QEMU's to the microsecond).
CLOCK_SLACK_S = 1e-5


@dataclass(frozen=True, slots=True)
class NetDevice:
    """Where QMP finds a virtio-net PCI device: its qdev id, PCI address, virtio path."""

    qdev_id: str
    pci_address: str

    @property
    def virtio_path(self) -> str:
        """The QOM path the ``x-query-virtio-*`` commands take."""
        return f"/machine/peripheral/{self.qdev_id}/virtio-backend"


async def find_net_device(qmp: QMPClient, qdev_id: str) -> NetDevice:
    """Locate the virtio-net device *qdev_id* on the root PCI bus.

    Raises `DeviceNotFound` unless QEMU lists a PCI device with that id and a virtio-net
    device at its virtio path.
    """
    device = _pci_device(await call(qmp, "query-pci"), qdev_id)
    virtio = {reply_field(d, "path", str, "x-query-virtio"): reply_field(
        d, "name", str, "x-query-virtio") for d in await _reply_list(qmp, "x-query-virtio")}
    if virtio.get(device.virtio_path) != VIRTIO_NET:
        found = virtio.get(device.virtio_path, "no virtio device")
        raise DeviceNotFound(f"PCI device {qdev_id!r} is not virtio-net ({found} at "
                             f"{device.virtio_path})")
    return device


def _pci_device(buses: object, qdev_id: str) -> NetDevice:
    """The device *qdev_id* in a ``query-pci`` reply."""
    if not isinstance(buses, list):
        raise QemuReplyError("query-pci", "reply is not a list")
    for bus in buses:
        for dev in reply_field(bus, "devices", list, "query-pci"):
            if isinstance(dev, dict) and dev.get("qdev_id") == qdev_id:
                number = reply_field(bus, "bus", int, "query-pci")
                slot = reply_field(dev, "slot", int, "query-pci")
                function = reply_field(dev, "function", int, "query-pci")
                return NetDevice(qdev_id, f"0000:{number:02x}:{slot:02x}.{function}")
    raise DeviceNotFound(f"no PCI device with id {qdev_id!r} in QEMU")


async def _reply_list(qmp: QMPClient, command: str) -> list[object]:
    reply = await call(qmp, command)
    if not isinstance(reply, list):
        raise QemuReplyError(command, "reply is not a list")
    return reply


class _PauseClock(EventListener):
    """QEMU's ``STOP`` and ``RESUME`` events, as (name, QEMU's wall-clock time) in the
    order heard, since the last `take`. Only that is kept: a listener of qemu.qmp's own
    keeps every event it ever heard."""

    def __init__(self) -> None:
        super().__init__(("STOP", "RESUME"))
        self._heard: list[tuple[str, float | None]] = []

    async def put(self, event: Message) -> None:
        if self.accept(event):
            self._heard.append((event["event"], _event_time(event)))

    def take(self) -> list[tuple[str, float | None]]:
        heard, self._heard = self._heard, []
        return heard


def _event_time(event: Message) -> float | None:
    """The time QEMU stamped on *event*, or None when it is not the documented
    ``{seconds, microseconds}`` of integers."""
    stamp = event.get("timestamp")
    if not isinstance(stamp, dict):
        return None
    seconds, micros = stamp.get("seconds"), stamp.get("microseconds")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (seconds, micros)):
        return None
    return seconds + micros / 1e6


class DeviceStateReader:
    """Takes device-state snapshots of one QEMU and reads a device's RSS state from them.

    Each `read` has QEMU save its devices' state (QMP ``xen-save-devices-state``, which
    pauses the VM for milliseconds) and parses the device's part. QEMU writes into a memory
    file (memfd) of the daemon's, handed over once as a QMP fd set (``add-fd``, the fd
    sent with SCM_RIGHTS): no path, no shared directory, nothing QEMU must be allowed to
    create. The file is emptied before each snapshot and read after it.

    Use as ``async with DeviceStateReader(qmp, version, pairs) as reader: await
    reader.read(device)``: entering hands the file to QEMU (`QemuCallFailed` if it does
    not take it), leaving takes it back (``remove-fd``) and closes it. The stream's layout
    depends on *qemu_version* (see `query_qemu_version`) and on *max_queue_pairs*, the
    device's number of queue pairs (its tap queues). One snapshot at a time.

    QEMU stops a running VM for the snapshot and says so: a ``STOP`` event once its
    vCPUs are paused, before the state is saved, and ``RESUME`` after, both before the
    command's reply and stamped with QEMU's wall-clock time (as its trace lines are).
    QEMU handles a guest's control command, trace lines included, in one go on a vCPU
    or on its main loop (with an ioeventfd: QEMU 7.2 under TCG does it there), and the
    main loop runs the snapshot command in one go too, so a line stamped before
    ``STOP`` belongs to a command whose effect is in the state saved after it. When
    exactly one such pair falls within the command's round trip, ``covers_until`` is
    the ``STOP`` time; otherwise (the VM was not running, or another client stopped it
    meanwhile) it is the time the snapshot was asked for, which is always covered.

    QEMU writes the stream in order from the start of the emptied file, and the device's
    section walks only once it is whole and followed by the next section or the end of
    the stream (`vnetbackend.qemu.snapshot`). `read` therefore tries the file each time
    QEMU writes to it (inotify) and takes the device's state as soon as its section
    walks, while QEMU still saves the sections after it, resumes the VM and answers; on
    this machine's QEMUs that is ~0.25 ms at the median, ~1 ms at p99, before the
    ``RESUME`` event would have been heard. A partial stream cannot show every candidate
    section, so `confirm` takes the reply and reads the whole stream as well: a stream
    whose device state differs from the early one, or does not read, fails the call
    (and the sync that made it, which is then done again). Without a write that walks,
    the reply is awaited and the whole file read.
    """

    def __init__(self, qmp: QMPClient, qemu_version: tuple[int, int, int],
                 max_queue_pairs: int) -> None:
        self._qmp = qmp
        self._qemu_version = qemu_version
        self._max_queue_pairs = max_queue_pairs
        #: Where the last `read` spent its time, in ms. The command's round trip, as far
        #: as the read waited on it: ``qmp-request`` (asked for, to QEMU's ``STOP``: the
        #: command sent, read and dispatched by QEMU, and the vCPUs paused), then either
        #: ``state-written`` (``STOP`` to the device's section read whole from the file)
        #: or, for a read at the reply, ``vm-pause`` (``STOP`` to ``RESUME``, QEMU's own
        #: times) and ``qmp-resume`` (the reply heard); or all of it as ``snapshot`` when
        #: QEMU's pause was not seen. Then ``read`` (the file) and ``parse`` (the walk)
        #: of the attempt that succeeded.
        self.last_stages_ms: dict[str, float] = {}
        #: Wall-clock time up to which a trace line's command is in the last snapshot.
        self.covers_until = float("-inf")
        self._pauses = _PauseClock()
        #: The snapshot command while its reply has not been taken (`confirm`).
        self._saving: asyncio.Future[object] | None = None
        #: The device and the state an early `read` took from the file, for `confirm`.
        self._early: tuple[NetDevice, DeviceState] | None = None
        self._written: FileWatch | None = None
        self._file = -1
        self._writer = -1
        self._fdset: int | None = None

    @property
    def qemu_version(self) -> tuple[int, int, int]:
        """The QEMU version whose layout the snapshots are read with."""
        return self._qemu_version

    async def __aenter__(self) -> DeviceStateReader:
        self._file = os.memfd_create(STATE_FILE_NAME, os.MFD_CLOEXEC)
        try:
            # QEMU opens this command's file O_WRONLY and hands out an fd-set member only
            # if its access mode is the same: give it a write-only open of the memfd.
            self._writer = os.open(f"/proc/self/fd/{self._file}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                self._qmp.send_fd_scm(self._writer)
            except (QMPError, OSError) as err:
                raise QemuCallFailed("add-fd", f"sending the fd: {err}") from err
            reply = await call(self._qmp, "add-fd", {"opaque": STATE_FILE_NAME})
            self._fdset = reply_field(reply, "fdset-id", int, "add-fd")
            self._written = FileWatch.of_fd(self._file)
        except BaseException:
            self._close_fds()
            raise
        self._qmp.register_listener(self._pauses)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._qmp.remove_listener(self._pauses)
        if self._saving is not None:
            self._saving.cancel()
            self._saving = None
        self._early = None
        try:
            if self._fdset is not None:
                with contextlib.suppress(QemuCallFailed):  # QEMU may be gone already
                    await call(self._qmp, "remove-fd", {"fdset-id": self._fdset})
        finally:
            self._fdset = None
            self._close_fds()

    def _close_fds(self) -> None:
        if self._written is not None:
            self._written.close()
            self._written = None
        for fd in (self._writer, self._file):
            if fd >= 0:
                os.close(fd)
        self._writer = self._file = -1

    async def snapshot(self) -> bytes:
        """QEMU's device-state stream now, once QEMU answered the command.

        Raises `QemuCallFailed` when QEMU does not take the snapshot and `SnapshotError`
        when it wrote more than `MAX_STATE_BYTES`.
        """
        asked, saving = await self._save()
        try:
            await saving
        finally:
            self._saving = None
        self.last_stages_ms = self._time_snapshot(asked, time.time())
        return self._stream()

    async def read(self, device: NetDevice) -> DeviceState:
        """*device* as QEMU holds it now: its RSS state and active queue pairs.

        Raises `QemuCallFailed` when QEMU does not take the snapshot and
        `vnetbackend.qemu.snapshot.SnapshotError` when the snapshot cannot be read. The
        command's reply may still be on its way: `confirm` takes it.
        """
        asked, saving = await self._save()
        written = self._written
        assert written is not None  # _save refuses a reader that was not entered
        while not saving.done():
            waiting = asyncio.ensure_future(written.written.wait())
            try:
                await asyncio.wait((saving, waiting), return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                saving.cancel()
                self._saving = None
                raise
            finally:
                waiting.cancel()
            if not written.written.is_set():
                break
            noticed = time.time()
            written.written.clear()
            try:
                state = self._parse(self._stream(), device)
            except SnapshotError:
                continue  # not whole yet: wait for the next write or the reply
            self._early = (device, state)
            self.last_stages_ms = {**self._time_snapshot(asked, noticed),
                                   **self.last_stages_ms}
            return state
        self._saving = None
        self.last_stages_ms = self._time_snapshot(asked, time.time())
        saving.result()
        return self._parse(self._stream(), device)

    async def confirm(self) -> None:
        """Take the reply to the last snapshot command, if not taken yet; after an early
        `read`, read the whole stream too.

        Raises `QemuCallFailed` when the reply is not a success, and `SnapshotError` when
        the whole stream does not read or holds another state than the early read took.
        """
        saving, self._saving = self._saving, None
        early, self._early = self._early, None
        if saving is not None:
            await saving
        if early is None:
            return
        device, state = early
        stages = self.last_stages_ms
        try:
            whole = self._parse(self._stream(), device)
        finally:
            self.last_stages_ms = stages
        if whole != state:
            raise SnapshotError(f"the whole device-state stream holds {whole}, not the "
                                f"{state} read while QEMU was still writing it")

    async def _save(self) -> tuple[float, asyncio.Future[object]]:
        """Have QEMU write its device state into the emptied file: when it was asked
        (wall clock), and the command's reply (kept for `confirm` until taken)."""
        await self.confirm()
        if self._fdset is None:
            raise QemuCallFailed("xen-save-devices-state", "QEMU holds no file for it "
                                 "(enter the DeviceStateReader first)")
        # QEMU writes at the offset of the open file it shares with self._writer.
        os.ftruncate(self._writer, 0)
        os.lseek(self._writer, 0, os.SEEK_SET)
        if self._written is not None:
            self._written.clear()
        self._pauses.take()
        self.last_stages_ms = {}
        asked = time.time()
        self._saving = asyncio.ensure_future(call(
            self._qmp, "xen-save-devices-state",
            {"filename": f"/dev/fdset/{self._fdset}", "live": False}))
        return asked, self._saving

    def _stream(self) -> bytes:
        """What the file holds."""
        read = time.perf_counter()
        size = os.fstat(self._file).st_size
        if size > MAX_STATE_BYTES:
            os.ftruncate(self._writer, 0)
            raise SnapshotError(f"device state of {size} bytes, more than the "
                                f"{MAX_STATE_BYTES} a snapshot may have")
        # Read in place: ~90 KB from memory takes microseconds, while the three
        # thread-pool hops of an async read cost ~1 ms on the mirror's path.
        stream = os.pread(self._file, size, 0)
        self.last_stages_ms["read"] = _ms_since(read)
        return stream

    def _parse(self, stream: bytes, device: NetDevice) -> DeviceState:
        parse = time.perf_counter()
        state = read_device_state(stream, device.pci_address, self._qemu_version,
                                  self._max_queue_pairs)
        self.last_stages_ms["parse"] = _ms_since(parse)
        return state

    def _time_snapshot(self, asked: float, seen: float) -> dict[str, float]:
        """Set `covers_until` for the snapshot asked for at *asked* and seen done (the
        device's state read, or the reply heard) at *seen*; its stages."""
        heard = self._pauses.take()
        names = [name for name, _ in heard]
        stop = heard[0][1] if names[:1] == ["STOP"] else None
        if stop is None or not asked - CLOCK_SLACK_S <= stop <= seen + CLOCK_SLACK_S:
            self.covers_until = asked
            return {"snapshot": _ms(seen - asked)}
        request = {"qmp-request": _ms(max(0.0, stop - asked))}
        if names == ["STOP"]:
            self.covers_until = max(asked, stop)
            return {**request, "state-written": _ms(max(0.0, seen - stop))}
        resume = heard[1][1]
        if names == ["STOP", "RESUME"] and resume is not None and stop <= resume <= (
                seen + CLOCK_SLACK_S):
            self.covers_until = max(asked, stop)
            return {**request, "vm-pause": _ms(resume - stop),
                    "qmp-resume": _ms(max(0.0, seen - resume))}
        self.covers_until = asked
        return {"snapshot": _ms(seen - asked)}


def _ms_since(start: float) -> float:
    return _ms(time.perf_counter() - start)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def query_qemu_version(qmp: QMPClient) -> tuple[int, int, int]:
    """(major, minor, micro) of the QEMU behind *qmp*, as ``query-version`` says."""
    reply = await call(qmp, "query-version")
    numbers = reply_field(reply, "qemu", dict, "query-version")
    return (reply_field(numbers, "major", int, "query-version"),
            reply_field(numbers, "minor", int, "query-version"),
            reply_field(numbers, "micro", int, "query-version"))
