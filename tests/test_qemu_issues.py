"""Known crashes are told by the line QEMU or the guest left, and only on the versions
seen."""

from __future__ import annotations

from vnetbackend.testbed.qemu_issues import (
    TCG_IOTLB_ASSERTION,
    TCG_PATCHED_CODE_INT3,
    TCG_VCPU_TIMER_LOST,
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


#: Lines of the Linux 6.12 guest's console under QEMU 10.0.2 while its agent got no answer.
TIMER_LOST = """\
[   41.378939] virtio_net virtio0 eth0: NETDEV WATCHDOG: CPU: 3: transmit queue 0 timed out 35488 ms
[   44.910923] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:
[   44.911421] rcu: \t2-...!: (0 ticks this GP) idle=b750/0/0x0 softirq=12/12 fqs=0 \
(false positive?)
[   44.913603] rcu: rcu_preempt kthread timer wakeup didn't happen for 5251 jiffies! g-963 f0x0 \
RCU_GP_WAIT_FQS(5) ->state=0x402
[   44.917517] rcu: \tPossible timer handling issue on cpu=2 timer-softirq=2
"""


def test_a_vcpu_without_timer_interrupts_is_told_by_the_console_on_10_0_only() -> None:
    assert known_crash("", TIMER_LOST, (10, 0, 2)) is TCG_VCPU_TIMER_LOST
    assert known_crash("", TIMER_LOST, (7, 2, 22)) is None
    assert known_crash(TIMER_LOST, BOOTING, (10, 0, 2)) is None
