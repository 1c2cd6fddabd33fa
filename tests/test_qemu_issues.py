"""Known crashes are told by the line QEMU or the guest left, and only on the versions
seen."""

from __future__ import annotations

from vnetbackend.testbed.qemu_issues import (
    TCG_IOTLB_ASSERTION,
    TCG_PATCHED_CODE_INT3,
    known_crash,
)

#: QEMU 10.0.2's last line when it aborted booting the Linux 6.12 test guest.
SEEN = ("qemu-system-x86_64: system/physmem.c:2678: iotlb_to_section: Assertion "
        "`section_index < d->map.sections_nb' failed.\n")


#: The Linux 6.12 guest's last console lines when it panicked booting under QEMU 10.0.2.
PANICKED = """\
[    1.981839] VFS: Dquot-cache hash table entries: 512 (order 0, 4096 bytes)
[    2.001206] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI
[    2.002066] CPU: 1 UID: 0 PID: 0 Comm: swapper/1 Not tainted 6.12.95+deb12-amd64 #1
[    2.002443] RIP: 0010:hrtimer_start_range_ns+0x1cb/0x440
[    2.004525] Kernel panic - not syncing: Fatal exception in interrupt
"""
BOOTING = "[    1.981839] VFS: Dquot-cache hash table entries: 512 (order 0, 4096 bytes)\n"


def test_the_iotlb_assertion_is_known_on_10_0_only() -> None:
    assert known_crash(SEEN, BOOTING, (10, 0, 2)) is TCG_IOTLB_ASSERTION
    assert known_crash(SEEN, BOOTING, (7, 2, 22)) is None
    assert known_crash("qemu-system-x86_64: terminating on signal 15\n", BOOTING,
                       (10, 0, 2)) is None


def test_the_guests_int3_panic_is_told_by_its_console_on_10_0_only() -> None:
    assert known_crash("", PANICKED, (10, 0, 2)) is TCG_PATCHED_CODE_INT3
    assert known_crash("", PANICKED, (7, 2, 22)) is None
    # The line counts in the console only: QEMU's own output saying it is no crash.
    assert known_crash(PANICKED, BOOTING, (10, 0, 2)) is None
