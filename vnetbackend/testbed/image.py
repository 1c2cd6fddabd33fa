"""Where scripts/build-guest leaves the test guests' kernels and initramfs.

One guest per kernel series (``6.1``, ``6.12``) in
``${VNETBACKEND_CACHE:-/var/cache/vnetbackend}/guest/<series>/``. No series given means
``$VNETBACKEND_GUEST_KERNEL`` if set, else `DEFAULT_SERIES`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vnetbackend.qemu.installs import cache_dir

#: The environment variable holding the default kernel series (tests, scripts).
GUEST_KERNEL_ENV = "VNETBACKEND_GUEST_KERNEL"
DEFAULT_SERIES = "6.1"


@dataclass(frozen=True, slots=True)
class GuestImage:
    kernel: Path
    initrd: Path


def chosen_series(series: str | None = None) -> str:
    return series or os.environ.get(GUEST_KERNEL_ENV) or DEFAULT_SERIES


def guest_dir(series: str | None = None) -> Path:
    """The directory scripts/build-guest builds *series* into."""
    return cache_dir() / "guest" / chosen_series(series)


def find_guest_image(series: str | None = None) -> GuestImage | None:
    """The built guest of *series*, or None if scripts/build-guest has not built it (or
    not finished)."""
    directory = guest_dir(series)
    image = GuestImage(directory / "vmlinuz", directory / "initramfs.cpio.gz")
    complete = (directory / "stamp").is_file()
    return image if complete and image.kernel.is_file() and image.initrd.is_file() else None
