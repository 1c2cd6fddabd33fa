"""Array maps made with ``BPF_F_MMAPABLE``, mapped into this process.

The program's report rings, its configuration slots and its control word live in such
maps, so that the daemon reads and writes them with plain memory accesses rather than a
system call per value (one costs ~0.08 ms on the mirror's path, where the daemon runs
cold). Element i of an array map starts i * value size (rounded up to 8 bytes) into the
mapping. Where the two sides hand something over through this memory, the order of the
accesses matters: `Atomics` gives the ordered loads and stores.
"""

from __future__ import annotations

import ctypes as ct
import mmap
import os

_libc = ct.CDLL(None, use_errno=True)
_libc.mmap.argtypes = [ct.c_void_p, ct.c_size_t, ct.c_int, ct.c_int, ct.c_int, ct.c_long]
_libc.mmap.restype = ct.c_void_p
_libc.munmap.argtypes = [ct.c_void_p, ct.c_size_t]
_libc.munmap.restype = ct.c_int
_MAP_FAILED = ct.c_void_p(-1).value

#: libatomic's memory orders.
RELEASE = 3
SEQ_CST = 5


class MappedMap:
    """The first *length* bytes (rounded up to pages) of the array map *fd*, shared with
    the kernel. Raises OSError (naming *what*) when the map cannot be mapped, e.g. one
    made without ``BPF_F_MMAPABLE``."""

    def __init__(self, fd: int, length: int, what: str) -> None:
        self.length = -(-length // mmap.PAGESIZE) * mmap.PAGESIZE
        address = _libc.mmap(None, self.length, mmap.PROT_READ | mmap.PROT_WRITE,
                             mmap.MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            err = ct.get_errno()
            raise OSError(err, f"mapping {what} (fd {fd}, {self.length} bytes): "
                               f"{os.strerror(err)}")
        self.address: int = address

    def close(self) -> None:
        """Unmap it (once); nothing may touch the memory afterwards."""
        if self.address:
            _libc.munmap(self.address, self.length)
            self.address = 0


class Atomics:
    """Loads, stores and exchanges with a memory order (libatomic), for memory the
    program reads or writes at the same time. On x86 a sequentially consistent exchange
    is a full barrier; a release store keeps every earlier store before it."""

    def __init__(self) -> None:
        lib = ct.CDLL("libatomic.so.1")  # OSError if missing: callers name what needs it
        self.load64 = lib["__atomic_load_8"]
        self.load64.argtypes = [ct.c_void_p, ct.c_int]
        self.load64.restype = ct.c_uint64
        self.exchange64 = lib["__atomic_exchange_8"]
        self.exchange64.argtypes = [ct.c_void_p, ct.c_uint64, ct.c_int]
        self.exchange64.restype = ct.c_uint64
        self.store32 = lib["__atomic_store_4"]
        self.store32.argtypes = [ct.c_void_p, ct.c_uint32, ct.c_int]
        self.store32.restype = None
