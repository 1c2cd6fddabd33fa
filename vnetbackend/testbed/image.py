"""Where scripts/build-guest leaves the test guest's kernel and initramfs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path("/var/cache/vnetbackend")


@dataclass(frozen=True, slots=True)
class GuestImage:
    kernel: Path
    initrd: Path


def guest_dir() -> Path:
    """``${VNETBACKEND_CACHE:-/var/cache/vnetbackend}/guest``, as scripts/build-guest uses."""
    return Path(os.environ.get("VNETBACKEND_CACHE") or DEFAULT_CACHE) / "guest"


def find_guest_image() -> GuestImage | None:
    """The built guest, or None if scripts/build-guest has not run (or not finished)."""
    directory = guest_dir()
    image = GuestImage(directory / "vmlinuz", directory / "initramfs.cpio.gz")
    complete = (directory / "stamp").is_file()
    return image if complete and image.kernel.is_file() and image.initrd.is_file() else None
