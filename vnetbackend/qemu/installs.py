"""The QEMUs this machine has, and choosing one (``--qemu PATH|VERSION``).

Candidates are the ``qemu-system-x86_64`` on PATH and those ``scripts/install-qemu``
unpacked under ``${VNETBACKEND_CACHE:-/var/cache/vnetbackend}/qemu/<version>/``. A
choice that looks like a version ("10.0", "7.2", "10.0.2") picks the newest candidate
whose version starts with it; any other choice is a binary, by path or by name on PATH.
No choice means ``$VNETBACKEND_QEMU`` if set, else the QEMU on PATH.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from vnetbackend.errors import VnetError
from vnetbackend.qemu.process import QEMU_BINARY, QemuVersionUnknown, qemu_version

#: The environment variable holding the default choice (tests, scripts).
QEMU_CHOICE_ENV = "VNETBACKEND_QEMU"
DEFAULT_CACHE = Path("/var/cache/vnetbackend")


def cache_dir() -> Path:
    """``${VNETBACKEND_CACHE:-/var/cache/vnetbackend}``: where the setup scripts put the
    private QEMUs and the test guests."""
    return Path(os.environ.get("VNETBACKEND_CACHE") or DEFAULT_CACHE)


@dataclass(frozen=True, slots=True)
class Qemu:
    """One QEMU binary and the version it reports."""

    binary: str
    version: tuple[int, int, int]

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))


class QemuNotFound(VnetError, LookupError):
    """No QEMU matches the choice; the message lists what there is."""


def candidate_binaries() -> list[str]:
    """The QEMU on PATH (if any), then the private ones in version-directory order."""
    found = []
    on_path = shutil.which(QEMU_BINARY)
    if on_path:
        found.append(on_path)
    private = cache_dir() / "qemu"
    if private.is_dir():
        for prefix in sorted(private.iterdir()):
            binary = prefix / "usr" / "bin" / QEMU_BINARY
            if os.access(binary, os.X_OK):
                found.append(str(binary))
    return found


def _version_prefix(choice: str) -> tuple[int, ...] | None:
    """(10, 0) for "10.0"; None for a choice that is not a version."""
    parts = choice.split(".")
    if len(parts) > 3 or not all(part.isdigit() for part in parts):
        return None
    return tuple(int(part) for part in parts)


async def installed_qemus() -> list[Qemu]:
    """Every candidate that answers ``--version``, newest first."""
    qemus = []
    for binary in candidate_binaries():
        try:
            qemus.append(Qemu(binary, await qemu_version(binary)))
        except QemuVersionUnknown:
            continue
    return sorted(qemus, key=lambda qemu: qemu.version, reverse=True)


async def choose_qemu(choice: str | None = None) -> Qemu:
    """The QEMU *choice* names (see the module's docstring); `QemuNotFound` or
    `QemuVersionUnknown` if there is none."""
    choice = choice or os.environ.get(QEMU_CHOICE_ENV) or None
    if choice is None:
        return Qemu(QEMU_BINARY, await qemu_version(QEMU_BINARY))
    wanted = _version_prefix(choice)
    if wanted is None:
        return Qemu(choice, await qemu_version(choice))
    qemus = await installed_qemus()
    for qemu in qemus:
        if qemu.version[:len(wanted)] == wanted:
            return qemu
    have = ", ".join(f"{qemu.version_text} ({qemu.binary})" for qemu in qemus) or "none"
    raise QemuNotFound(f"no QEMU {choice} on this machine; there is: {have} "
                       f"(scripts/install-qemu installs 10.0)")
