"""Crashes under QEMU that the test bed has met while a guest booted or was prepared for
a test, as data with the evidence beside them.

A boot that ends in one of these, on a version it was seen on, is booted once more
(`vnetbackend.testbed.guest.boot_guest`) with a `KnownQemuCrash` warning; any other
failure fails the boot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class QemuCrash:
    """A way a boot under QEMU dies on its own: ``signature`` is the line it leaves in
    QEMU's output, or in the guest's console when ``in_console``."""

    name: str
    description: str
    evidence: str
    signature: str
    seen_on: tuple[tuple[int, int], ...]
    in_console: bool = False


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

TCG_PATCHED_CODE_INT3 = QemuCrash(
    name="qemu-10.0-tcg-int3-after-text-patch",
    description="the Linux 6.12 guest under QEMU 10.0.2's multi-threaded TCG takes an "
                "int3 trap at an instruction its kernel was patching (a 5-byte NOP of a "
                "static key) that its int3 handler no longer claims, and panics while "
                "booting; the cause (the emulation of cross-modified code or the guest) "
                "is not established",
    evidence="one boot in about sixty of a CI run (three guests with -smp 4 booted in a "
             "row): 'Oops: int3: 0000 [#1] PREEMPT SMP NOPTI' on CPU 1 in the idle "
             "task, RIP hrtimer_start_range_ns+0x1cb, code '0f <1f> 44 00 00', then "
             "'Kernel panic - not syncing: Fatal exception in interrupt', and QEMU "
             "exited with status 0 (-no-reboot) before the guest was ready; never seen "
             "with QEMU 7.2",
    signature="Oops: int3: ",
    seen_on=((10, 0),),
    in_console=True,
)

TCG_VCPU_TIMER_LOST = QemuCrash(
    name="qemu-10.0-tcg-vcpu-timer-lost",
    description="under QEMU 10.0.2's multi-threaded TCG one vCPU of the Linux 6.12 guest "
                "stops taking its timer interrupts soon after boot: the guest's RCU "
                "grace-period kthread, sleeping on that CPU, never wakes, a transmit "
                "queue times out, and a command that needs every CPU never returns; the "
                "cause is not established",
    evidence="twice in four runs of the guest tests on 10.0 (55 boots each), both times "
             "at the first command that needs every CPU (resizing the trace buffer, which "
             "runs work on each CPU, while preparing the guest), which got no answer in "
             "60 s. The console of the second: 'rcu: INFO: rcu_preempt detected stalls "
             "on CPUs/tasks', 'rcu: "
             "rcu_preempt kthread timer wakeup didn't happen for 5251 jiffies!', 'rcu: "
             "\tPossible timer handling issue on cpu=2 timer-softirq=2', 'virtio_net "
             "virtio0 eth0: NETDEV WATCHDOG: CPU: 3: transmit queue 0 timed out 35488 "
             "ms'; CPU 2 still answered the NMI of the stall report, idle in "
             "pv_native_safe_halt. Never seen with QEMU 7.2",
    signature="Possible timer handling issue on cpu=",
    seen_on=((10, 0),),
    in_console=True,
)

KNOWN_CRASHES: tuple[QemuCrash, ...] = (TCG_IOTLB_ASSERTION, TCG_PATCHED_CODE_INT3,
                                        TCG_VCPU_TIMER_LOST)


class KnownQemuCrash(UserWarning):
    """A boot ended in a known QEMU crash and the guest is booted again."""


def known_crash(qemu_output: str, console: str, qemu_version: Sequence[int],
                ) -> QemuCrash | None:
    """The known crash that QEMU's output or the guest's console shows, for QEMU
    *qemu_version*, if any."""
    series = (qemu_version[0], qemu_version[1])
    return next((crash for crash in KNOWN_CRASHES
                 if series in crash.seen_on
                 and crash.signature in (console if crash.in_console else qemu_output)),
                None)
