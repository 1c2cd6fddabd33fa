"""What the test bed runs on: a QEMU and a test guest kernel, each chosen by the user.

``qemu`` is a path or a version (`vnetbackend.qemu.installs`), ``guest_kernel`` a kernel
series (`vnetbackend.testbed.image`); None leaves each to the environment
(``VNETBACKEND_QEMU``, ``VNETBACKEND_GUEST_KERNEL``) and then to the defaults: the QEMU
on PATH and Linux 6.1.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from vnetbackend.errors import VnetError
from vnetbackend.qemu.installs import Qemu, choose_qemu
from vnetbackend.testbed.image import GuestImage, chosen_series, find_guest_image


class GuestImageMissing(VnetError, FileNotFoundError):
    """The chosen test guest has not been built."""


@dataclass(frozen=True, slots=True)
class Platform:
    qemu: str | None = None
    guest_kernel: str | None = None

    async def resolve(self) -> tuple[Qemu, GuestImage]:
        """The QEMU and the built guest this platform names; `GuestImageMissing` if the
        guest is not built, `vnetbackend.qemu.installs.QemuNotFound` if the QEMU is not
        there."""
        image = find_guest_image(self.guest_kernel)
        if image is None:
            raise GuestImageMissing(f"no Linux {chosen_series(self.guest_kernel)} test "
                                    "guest: run scripts/setup")
        return await choose_qemu(self.qemu), image

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Platform:
        """The platform `vnetbackend.choices.add_platform_options` parsed."""
        return cls(args.qemu, getattr(args, "guest_kernel", None))
