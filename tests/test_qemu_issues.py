"""Known QEMU crashes are told by the line QEMU left, and only on the versions seen."""

from __future__ import annotations

from vnetbackend.testbed.qemu_issues import TCG_IOTLB_ASSERTION, known_crash

#: QEMU 10.0.2's last line when it aborted booting the Linux 6.12 test guest.
SEEN = ("qemu-system-x86_64: system/physmem.c:2678: iotlb_to_section: Assertion "
        "`section_index < d->map.sections_nb' failed.\n")


def test_the_iotlb_assertion_is_known_on_10_0_only() -> None:
    assert known_crash(SEEN, (10, 0, 2)) is TCG_IOTLB_ASSERTION
    assert known_crash(SEEN, (7, 2, 22)) is None
    assert known_crash("qemu-system-x86_64: terminating on signal 15\n", (10, 0, 2)) is None
