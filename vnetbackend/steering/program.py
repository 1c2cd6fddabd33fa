"""Loading the steering program with bcc, writing its maps and attaching it to a tap.

RSS state lives in two slots of the `rss_slots` map; `apply` writes the slot that is not
in use and then switches the program to it, so frames never see a half-written
configuration. States the program can be in:

* RSS on (`apply(config)`): hash by the configuration, queue from the indirection table,
  unclassified frames to ``config.unclassified_queue``.
* hash only (`apply(config, redirect=False)`): hash and report as configured, every frame
  to ``config.unclassified_queue`` (the device computes hashes but does not steer).
* RSS off (`disable()`, also the state right after loading): no hash, report type NONE,
  every frame to queue 0.

Every switch bumps a generation counter that the new slot carries and every report
repeats (`generation`): a report is judged by the configuration that steered its frame,
even one in flight across a switch. The last `GENERATIONS_KEPT` generations are kept.

Queues as the tap delivers them: tun takes the program's answer modulo the queues attached
to the tap, which QEMU keeps at the device's active pairs. `apply` takes that number
(*delivered_queues*) and writes each table entry (and the unclassified queue) already
reduced modulo it, so the program's answer, and its report, is the queue a frame really
reaches, at no cost per frame.

The slots and the control word are written through their mapping in this process's
memory (`vnetbackend.steering.mapped`): a switch is plain stores into the spare slot and
then one release store of ``active_slot``, with no system call.

One writer at a time: `apply` and `disable` reuse the spare slot, so two concurrent
writers (or two switches while a frame is still being steered by the older slot) could
mix configurations.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes as ct
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from vnetbackend import tap
from vnetbackend.errors import VnetError
from vnetbackend.rss import RssConfig
from vnetbackend.rss.toeplitz import tables_for
from vnetbackend.rss.types import MAX_HASH_INPUT
from vnetbackend.steering.layout import (
    SLOT_COUNT,
    RssSlot,
    SteeringControl,
    SteeringCounters,
    layout_defines,
)
from vnetbackend.steering.mapped import RELEASE, Atomics, MappedMap
from vnetbackend.steering.reports import ReportReader, ReportRings
from vnetbackend.steering.ring import RingBuffer
from vnetbackend.steering.tables import cached_rows

#: Where the C source lives: ``bpf/`` at the top of the repository.
SOURCE_PATH = Path(__file__).resolve().parents[2] / "bpf" / "steering.bpf.c"
#: Records in each CPU's report ring (a power of two).
DEFAULT_REPORT_SLOTS = 4096
#: Configurations remembered by generation, for reports still to be judged.
GENERATIONS_KEPT = 64
#: Where slot i starts in the mapped `rss_slots`: the kernel rounds an array map's
#: elements up to 8 bytes.
_SLOT_STRIDE = -(-ct.sizeof(RssSlot) // 8) * 8


class SteeringError(VnetError):
    """The steering program could not be loaded, or its maps not read or written."""


class MapsInconsistent(SteeringError):
    """The program's maps disagree with themselves (e.g. tables not built from the key)."""


@dataclass(frozen=True, slots=True)
class Counters:
    """Totals over all CPUs since load (or the last `reset_counters`)."""

    frames: int
    reports: int
    reports_dropped: int


@dataclass(frozen=True, slots=True)
class SteeringState:
    """What the maps say: RSS on or off, steering or hash-only, and the configuration."""

    enabled: bool
    redirect: bool
    config: RssConfig | None


@dataclass(frozen=True, slots=True)
class Generation:
    """One configuration the program was switched to: `number` as its reports carry it,
    the state as applied (the guest's table, not reduced), and *delivered_queues*: the
    queues the tap delivers among (None: as many as ``config.queues``)."""

    number: int
    state: SteeringState
    delivered_queues: int | None = None


@contextlib.contextmanager
def _compiler_output() -> Iterator[Callable[[], list[str]]]:
    """Collect what the compiler writes to fd 2 while the block runs (bcc prints its
    diagnostics there, not into the exception); it is written to fd 2 again after."""
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: text.splitlines()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace")
            os.write(2, text.encode())


def _map_call(name: str, what: str, result: int) -> None:
    if result < 0:
        err = ct.get_errno()
        raise SteeringError(f"steering map {name}: {what} failed: {os.strerror(err)}")


class SteeringProgram:
    """The steering program, loaded and verified, with its maps.

    *report_slots* sizes each CPU's report ring (a power of two, in records).
    """

    def __init__(self, *, report_slots: int = DEFAULT_REPORT_SLOTS,
                 source: Path = SOURCE_PATH) -> None:
        if report_slots < 1 or report_slots & (report_slots - 1):
            raise ValueError(f"report_slots must be a power of two, got {report_slots}")
        try:
            text = source.read_text()
        except OSError as err:
            raise SteeringError(f"steering program source {source}: {err.strerror}") from None
        from bcc import BPF  # imported late: bcc needs root and kernel headers to be useful
        from bcc.libbcc import lib
        from bcc.utils import get_possible_cpus

        self._lib = lib
        possible = get_possible_cpus()
        self._cpus = len(possible)  # values in a per-CPU map
        # The report rings are indexed by CPU number: one for every number a CPU can have.
        self._ring_cpus = max(possible) + 1
        with _compiler_output() as diagnostics:
            try:
                self._bpf = BPF(text=text.encode(),
                                cflags=[f"-DREPORT_CPUS={self._ring_cpus}",
                                        f"-DREPORT_SLOTS={report_slots}",
                                        *layout_defines()])
                self._function = self._bpf.load_func(b"steer", BPF.SOCKET_FILTER)
            except Exception as err:  # bcc raises bare Exception for compile/verifier errors
                failure: Exception | None = err
            else:
                failure = None
        if failure is not None:
            errors = [line for line in diagnostics() if "error:" in line]
            raise SteeringError("\n".join([f"loading {source.name}: {failure}", *errors])
                                ) from failure
        self._fds = {name: self._bpf[name.encode()].map_fd
                     for name in ("rss_slots", "control", "counters", "report_cursors",
                                  "report_slots", "report_bell")}
        self.report_slots = report_slots
        self._init_generations()
        self._rings: ReportRings | None = None
        self._reader: ReportReader | None = None
        self._bell: RingBuffer | None = None
        self._prog_fd, self._release = self._function.fd, self._bpf.cleanup
        self._values: _Values | None = _map_values(self._fds, self._release)

    # -- instances loaded without compiling (vnetbackend.steering.instances) -----------

    @classmethod
    def from_loaded(cls, prog_fd: int, map_fds: Mapping[str, int], report_cpus: int,
                    report_slots: int, release: Callable[[], None]) -> SteeringProgram:
        """A program some other loader put in the kernel: *prog_fd* and its maps by name
        (the names the C source gives them), its report rings' shape (*report_cpus* rings
        of *report_slots* records); *release* closes them all."""
        from bcc.libbcc import lib
        from bcc.utils import get_possible_cpus

        program = cls.__new__(cls)
        program._lib, program._cpus = lib, len(get_possible_cpus())
        program._bpf = None
        program._fds = dict(map_fds)
        program._ring_cpus, program.report_slots = report_cpus, report_slots
        program._rings = program._reader = program._bell = None
        program._prog_fd, program._release = prog_fd, release
        program._init_generations()
        program._values = _map_values(program._fds, release)
        return program

    def _init_generations(self) -> None:
        """Fresh maps: both slots zero, i.e. RSS off in generation 0."""
        self._generation = 0
        self._generations: collections.OrderedDict[int, Generation] = collections.OrderedDict(
            {0: Generation(0, SteeringState(False, False, None))})

    def compiled(self) -> tuple[bytes, str]:
        """The instructions of ``steer`` as the compiler left them (map references hold
        this program's map fds) and the program's license."""
        if self._bpf is None:
            raise SteeringError("this program was not compiled here: clone the original")
        from bcc.libbcc import lib

        return bytes(self._bpf.dump_func(b"steer")), lib.bpf_module_license(
            self._bpf.module).decode()

    # -- lifetime ---------------------------------------------------------------------

    @property
    def fd(self) -> int:
        """The program's fd, for TUNSETSTEERINGEBPF or BPF_PROG_TEST_RUN."""
        return self._prog_fd

    @property
    def map_fds(self) -> dict[str, int]:
        """The fds of the program's maps by name, for tools that read or alter them."""
        return dict(self._fds)

    def close(self) -> None:
        """Unload (a tap the program is attached to keeps its own reference)."""
        if self._values is not None:
            self._values.close()
            self._values = None
        if self._rings is not None:
            self._rings.close()
            self._rings = self._reader = None
        if self._bell is not None:
            self._bell.close()
            self._bell = None
        self._release()

    def __enter__(self) -> SteeringProgram:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- raw map access -----------------------------------------------------------------

    def _lookup(self, name: str, index: int, value: ct.Array | ct.Structure) -> None:
        key = ct.c_uint32(index)
        _map_call(name, f"lookup [{index}]",
                  self._lib.bpf_lookup_elem(self._fds[name], ct.byref(key), ct.byref(value)))

    def _update(self, name: str, index: int, value: ct.Array | ct.Structure) -> None:
        key = ct.c_uint32(index)
        _map_call(name, f"update [{index}]",
                  self._lib.bpf_update_elem(self._fds[name], ct.byref(key), ct.byref(value), 0))

    def _mapped(self) -> _Values:
        if self._values is None:
            raise SteeringError("the steering program was closed")
        return self._values

    def _active_slot(self) -> RssSlot:
        values = self._mapped()
        return values.slots[values.control.active_slot % SLOT_COUNT]

    def _switch_to(self, state: SteeringState, fill: Callable[[RssSlot], None],
                   delivered_queues: int | None = None) -> None:
        """Have *fill* write *state* into the spare slot, then make that slot live. The
        slot's fields before its Toeplitz tables are cleared first; the tables are left
        to *fill* (`apply` writes them whole, and RSS off never reads them)."""
        values = self._mapped()
        spare = (values.control.active_slot + 1) % SLOT_COUNT
        slot = values.slots[spare]
        ct.memset(ct.addressof(slot), 0, RssSlot.toeplitz.offset)
        fill(slot)
        number = (self._generation + 1) & 0xFFFFFFFF
        slot.generation = number
        # Known before the switch: a report of the new generation may come at once.
        self._generations[number] = Generation(number, state, delivered_queues)
        while len(self._generations) > GENERATIONS_KEPT:
            self._generations.popitem(last=False)
        values.atomics.store32(ct.addressof(values.control)
                               + SteeringControl.active_slot.offset, spare, RELEASE)
        self._generation = number

    @property
    def generation(self) -> int:
        """The generation of the live configuration (0 right after loading)."""
        return self._generation

    def generation_of(self, number: int) -> Generation | None:
        """The configuration of generation *number*, or None if it is no longer kept."""
        return self._generations.get(number)

    # -- configuration ------------------------------------------------------------------

    def apply(self, config: RssConfig, *, redirect: bool = True,
              delivered_queues: int | None = None) -> None:
        """Make *config* the live RSS configuration (see the module docstring); the tap
        delivers among *delivered_queues* queues (None: ``config.queues``).

        Anything but an `RssConfig` is refused with TypeError, a *delivered_queues* below 1
        with ValueError; either changes nothing.
        """
        if not isinstance(config, RssConfig):
            raise TypeError(f"apply needs an RssConfig, got {type(config).__name__}")
        if delivered_queues is not None and (not isinstance(delivered_queues, int)
                                             or delivered_queues < 1):
            raise ValueError(f"delivered_queues must be a positive integer, "
                             f"got {delivered_queues!r}")
        modulo = delivered_queues or config.queues
        rows = cached_rows(bytes(config.key))
        assert rows.nbytes == RssSlot.toeplitz.size
        table = [queue % modulo for queue in config.indirection_table]

        def fill(slot: RssSlot) -> None:
            slot.enabled, slot.redirect = 1, int(bool(redirect))
            slot.hash_types, slot.table_length = int(config.hash_types), len(table)
            slot.unclassified_queue = config.unclassified_queue % modulo
            slot.queues, slot.key_length = config.queues, len(config.key)
            slot.key[: len(config.key)] = config.key
            slot.indirection[: len(table)] = table
            ct.memmove(ct.addressof(slot.toeplitz), rows.ctypes.data, rows.nbytes)

        self._switch_to(SteeringState(True, bool(redirect), config), fill, delivered_queues)

    def disable(self) -> None:
        """RSS off: no hash, report type NONE, every frame to queue 0."""
        def fill(slot: RssSlot) -> None:
            slot.table_length, slot.queues = 1, 1

        self._switch_to(SteeringState(False, False, None), fill)

    def read_state(self) -> SteeringState:
        """The live configuration as the maps hold it.

        Raises `MapsInconsistent` if the Toeplitz tables were not built from the stored
        key, and InvalidRssConfig if the stored values are no valid configuration.
        """
        slot = RssSlot.from_buffer_copy(self._active_slot())
        if not slot.enabled:
            return SteeringState(False, False, None)
        key = bytes(slot.key)[: slot.key_length]
        expected = tables_for(key)
        for position in range(MAX_HASH_INPUT):
            found = list(slot.toeplitz[position])
            if found != list(expected[position]):
                byte = next(v for v in range(256) if found[v] != expected[position][v])
                raise MapsInconsistent(
                    f"toeplitz[{position}][{byte}] = 0x{found[byte]:08x}, the key gives "
                    f"0x{expected[position][byte]:08x}")
        config = RssConfig(hash_types=slot.hash_types, key=key,
                           indirection_table=list(slot.indirection)[: slot.table_length],
                           queues=slot.queues, unclassified_queue=slot.unclassified_queue)
        return SteeringState(True, bool(slot.redirect), config)

    def read_config(self) -> RssConfig | None:
        """The live RssConfig, or None while RSS is off (see `read_state`)."""
        return self.read_state().config

    # -- reports and counters -----------------------------------------------------------

    def set_reports(self, every: int) -> None:
        """Report one frame in *every* (per CPU); 0 switches reports off."""
        if not isinstance(every, int) or not 0 <= every <= 0xFFFFFFFF:
            raise ValueError(f"report sampling must be 0..2**32-1, got {every!r}")
        self._mapped().control.report_every = every

    @property
    def report_every(self) -> int:
        return self._mapped().control.report_every

    def counters(self) -> Counters:
        per_cpu = (SteeringCounters * self._cpus)()
        self._lookup("counters", 0, per_cpu)
        return Counters(frames=sum(c.frames for c in per_cpu),
                        reports=sum(c.reports for c in per_cpu),
                        reports_dropped=sum(c.reports_dropped for c in per_cpu))

    def reset_counters(self) -> None:
        """Zero the counters and restart the sampling on every CPU."""
        self._update("counters", 0, (SteeringCounters * self._cpus)())

    def report_rings(self) -> ReportRings:
        """This program's report rings, for reading records in batches
        (`ReportRings.take_batch`); they are the rings `reports` reads."""
        self.reports()
        assert self._rings is not None
        return self._rings

    def reports(self) -> ReportReader:
        """The reader of this program's report rings (one per program)."""
        if self._reader is None:
            self._bell = RingBuffer(self._fds["report_bell"])
            self._bell.open(lambda _ctx, _data, _size: 0)
            self._rings = ReportRings(self._fds["report_cursors"], self._fds["report_slots"],
                                      self._fds["report_bell"], self._bell.consume,
                                      cpus=self._ring_cpus, slots=self.report_slots)
            self._reader = ReportReader(self._rings)
        return self._reader

    # -- taps ---------------------------------------------------------------------------

    def attach(self, queue_fd: int) -> None:
        """Make this the steering program of the tap behind *queue_fd* (a control queue)."""
        tap.set_steering_program(queue_fd, self.fd)

    @staticmethod
    def detach(queue_fd: int) -> None:
        """Remove whatever steering program the tap behind *queue_fd* has."""
        tap.set_steering_program(queue_fd, -1)


@dataclass
class _Values:
    """The slots and the control word, as mapped into this process."""

    slot_memory: MappedMap
    control_memory: MappedMap
    atomics: Atomics
    slots: list[RssSlot]
    control: SteeringControl

    def close(self) -> None:
        self.slots.clear()
        self.slot_memory.close()
        self.control_memory.close()


def _map_values(fds: Mapping[str, int], release: Callable[[], None]) -> _Values:
    """Map the program's slots and control word (maps made with ``BPF_F_MMAPABLE``);
    *release* frees the program if they cannot be mapped."""
    try:
        atomics = Atomics()
        slot_memory = MappedMap(fds["rss_slots"], SLOT_COUNT * _SLOT_STRIDE, "rss_slots")
        try:
            control_memory = MappedMap(fds["control"], ct.sizeof(SteeringControl), "control")
        except OSError:
            slot_memory.close()
            raise
    except OSError as err:
        release()
        raise SteeringError(f"steering maps: {err}") from None
    slots = [RssSlot.from_address(slot_memory.address + index * _SLOT_STRIDE)
             for index in range(SLOT_COUNT)]
    return _Values(slot_memory, control_memory, atomics, slots,
                   SteeringControl.from_address(control_memory.address))
