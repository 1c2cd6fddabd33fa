"""QEMU crashes the test bed has met, as data with the evidence beside them.

A boot that ends in one of these, on a version it was seen on, is booted once more
(`vnetbackend.testbed.guest.boot_guest`) with a `KnownQemuCrash` warning; any other
end of QEMU fails the boot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class QemuCrash:
    """A way QEMU dies on its own: ``signature`` is the line it leaves in its output."""

    name: str
    description: str
    evidence: str
    signature: str
    seen_on: tuple[tuple[int, int], ...]


TCG_IOTLB_ASSERTION = QemuCrash(
    name="qemu-10.0-tcg-iotlb-to-section",
    description="QEMU 10.0.2 under multi-threaded TCG aborts while the guest boots: a vCPU "
                "looks up a memory section its address-space dispatch no longer has",
    evidence="one boot in about sixty of the Linux 6.12 guest with -smp 4 ended with "
             "status -6 and 'system/physmem.c:2678: iotlb_to_section: Assertion "
             "`section_index < d->map.sections_nb' failed.' before the guest was ready; "
             "never seen with QEMU 7.2",
    signature="iotlb_to_section: Assertion",
    seen_on=((10, 0),),
)

KNOWN_CRASHES: tuple[QemuCrash, ...] = (TCG_IOTLB_ASSERTION,)


class KnownQemuCrash(UserWarning):
    """A boot ended in a known QEMU crash and the guest is booted again."""


def known_crash(qemu_output: str, qemu_version: Sequence[int]) -> QemuCrash | None:
    """The known crash *qemu_output* shows, for QEMU *qemu_version*, if any."""
    series = (qemu_version[0], qemu_version[1])
    return next((crash for crash in KNOWN_CRASHES
                 if series in crash.seen_on and crash.signature in qemu_output), None)
