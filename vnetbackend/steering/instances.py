"""Compile once, load many: further instances of the steering program, each with its own maps.

bcc compiles the C source with LLVM inside the process (a second or two, and LLVM's
memory stays resident after). A daemon serving many devices compiles once
(`ProgramSource`) and loads every device's program from the compiled image
(`ProgramImage`): fresh maps with the same attributes, the instructions with the map
references pointing at them, one BPF_PROG_LOAD. The kernel verifies each load as it
verifies bcc's.

The maps are found in the instructions, not listed here: every ``BPF_LD_IMM64`` whose
source register is ``BPF_PSEUDO_MAP_FD`` (or ``BPF_PSEUDO_MAP_VALUE``) names a map by
the fd bcc created; the kernel tells each map's type, key and value size, entry count,
flags and name (``BPF_OBJ_GET_INFO_BY_FD``). A new instance's maps start empty, as bcc's
do after a compile; map BTF is not carried over (the program uses no map feature that
needs it). The report ring is one of the maps, so each instance has its own.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from vnetbackend.steering.program import SteeringError, SteeringProgram

_SYS_BPF = 321  # x86_64
_BPF_MAP_CREATE = 0
_BPF_PROG_LOAD = 5
_BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_TYPE_SOCKET_FILTER = 1
_BPF_PSEUDO_MAP_FD = 1
_BPF_PSEUDO_MAP_VALUE = 2
_LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW
_INSN = struct.Struct("<BBhi")
_LOG_SIZE = 1 << 22
_libc = ct.CDLL(None, use_errno=True)


class _MapInfo(ct.Structure):
    """The head of ``struct bpf_map_info`` (the kernel fills as much as it is given)."""

    _fields_ = [
        ("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
        ("map_flags", ct.c_uint32), ("name", ct.c_char * 16),
    ]


class _InfoAttr(ct.Structure):
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


class _MapCreateAttr(ct.Structure):
    _fields_ = [
        ("map_type", ct.c_uint32), ("key_size", ct.c_uint32), ("value_size", ct.c_uint32),
        ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
        ("inner_map_fd", ct.c_uint32), ("numa_node", ct.c_uint32),
        ("map_name", ct.c_char * 16),
    ]


class _ProgLoadAttr(ct.Structure):
    _fields_ = [
        ("prog_type", ct.c_uint32), ("insn_cnt", ct.c_uint32), ("insns", ct.c_uint64),
        ("license", ct.c_uint64), ("log_level", ct.c_uint32), ("log_size", ct.c_uint32),
        ("log_buf", ct.c_uint64), ("kern_version", ct.c_uint32),
        ("prog_flags", ct.c_uint32), ("prog_name", ct.c_char * 16),
    ]


def _bpf(cmd: int, attr: ct.Structure, what: str) -> int:
    result: int = _libc.syscall(ct.c_long(_SYS_BPF), ct.c_int(cmd), ct.byref(attr),
                                ct.c_uint(ct.sizeof(attr)))
    if result < 0:
        err = ct.get_errno()
        raise SteeringError(f"{what}: {os.strerror(err)}")
    return result


@dataclass(frozen=True, slots=True)
class MapSpec:
    """What a new map needs to be like one of the compiled program's."""

    name: str
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int

    @classmethod
    def of_fd(cls, fd: int) -> MapSpec:
        info = _MapInfo()
        attr = _InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info), info=ct.addressof(info))
        _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr, f"map info of fd {fd}")
        return cls(info.name.decode(), info.type, info.key_size, info.value_size,
                   info.max_entries, info.map_flags)

    def create(self) -> int:
        """A new, empty map of this kind; its fd."""
        attr = _MapCreateAttr(map_type=self.map_type, key_size=self.key_size,
                              value_size=self.value_size, max_entries=self.max_entries,
                              map_flags=self.flags, map_name=self.name.encode())
        return _bpf(_BPF_MAP_CREATE, attr, f"create map {self.name}")


@dataclass(frozen=True, slots=True)
class ProgramImage:
    """A compiled steering program, ready to load again with maps of its own.

    *references* pairs the index of each map-referencing instruction with the index of
    its map in *maps*.
    """

    instructions: bytes
    license: str
    maps: tuple[MapSpec, ...]
    references: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, program: SteeringProgram) -> ProgramImage:
        """The image of *program*, which must have been compiled in this process."""
        instructions, license_ = program.compiled()
        fds: list[int] = []
        references = []
        for index in range(len(instructions) // _INSN.size):
            code, regs, _, imm = _INSN.unpack_from(instructions, index * _INSN.size)
            if code != _LD_IMM64:
                continue
            source = regs >> 4
            if source in (_BPF_PSEUDO_MAP_FD, _BPF_PSEUDO_MAP_VALUE):
                if imm not in fds:
                    fds.append(imm)
                references.append((index, fds.index(imm)))
            elif source != 0:
                raise SteeringError(f"instruction {index}: a 64-bit load with source "
                                    f"{source} is not a reference this loader can move")
        maps = tuple(MapSpec.of_fd(fd) for fd in fds)
        names = [spec.name for spec in maps]
        if len(set(names)) != len(names) or "" in names:
            raise SteeringError(f"the program's maps need distinct names, got {names}")
        return cls(instructions, license_, maps, tuple(references))

    @property
    def report_shape(self) -> tuple[int, int]:
        """(rings, records per ring) of the report rings: one cursor per ring in
        ``report_cursors``, all rings' records in ``report_slots``."""
        sizes = {spec.name: spec.max_entries for spec in self.maps}
        try:
            rings = sizes["report_cursors"]
            return rings, sizes["report_slots"] // rings
        except (KeyError, ZeroDivisionError):
            raise SteeringError(f"the program has no report rings: maps {sorted(sizes)}"
                                ) from None

    def load(self) -> SteeringProgram:
        """A new instance: new maps, the program loaded and verified on them."""
        fds: list[int] = []
        try:
            for spec in self.maps:
                fds.append(spec.create())
            prog_fd = self._load_with(fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return SteeringProgram.from_loaded(
            prog_fd, {spec.name: fd for spec, fd in zip(self.maps, fds, strict=True)},
            *self.report_shape, _closer([prog_fd, *fds]))

    def _load_with(self, map_fds: list[int]) -> int:
        code = bytearray(self.instructions)
        for index, which in self.references:
            struct.pack_into("<i", code, index * _INSN.size + 4, map_fds[which])
        insns = (ct.c_char * len(code)).from_buffer(code)
        license_ = ct.create_string_buffer(self.license.encode())
        attr = _ProgLoadAttr(prog_type=BPF_PROG_TYPE_SOCKET_FILTER,
                             insn_cnt=len(code) // _INSN.size, insns=ct.addressof(insns),
                             license=ct.addressof(license_), prog_name=b"steer")
        try:
            return _bpf(_BPF_PROG_LOAD, attr, "load the steering program")
        except SteeringError as err:
            raise SteeringError(f"{err}\n{self._verifier_log(attr)}") from None

    @staticmethod
    def _verifier_log(attr: _ProgLoadAttr) -> str:
        """The verifier's last lines on a failed load (it is loaded again to get them)."""
        log = ct.create_string_buffer(_LOG_SIZE)
        attr.log_level, attr.log_size, attr.log_buf = 1, _LOG_SIZE, ct.addressof(log)
        with contextlib.suppress(SteeringError):
            os.close(_bpf(_BPF_PROG_LOAD, attr, "load"))
        return "\n".join(log.value.decode(errors="replace").splitlines()[-20:])


def _closer(fds: list[int]) -> Callable[[], None]:
    def close() -> None:
        while fds:
            os.close(fds.pop())
    return close


class ProgramSource:
    """Steering programs for a daemon: compiled on the first `compile` (or `instance`),
    every instance loaded from that one image."""

    def __init__(self) -> None:
        self._image: ProgramImage | None = None

    def compile(self) -> ProgramImage:
        """Compile the program if not done yet; the image (the compiled program's own
        maps and fds are released once the image is taken)."""
        if self._image is None:
            with SteeringProgram() as compiled:
                self._image = ProgramImage.of(compiled)
        return self._image

    def instance(self) -> SteeringProgram:
        """A new instance with maps of its own (compiling first if need be)."""
        return self.compile().load()
