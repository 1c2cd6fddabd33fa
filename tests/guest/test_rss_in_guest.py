"""Every injected frame's queue and hash in the guest equal the reference model's.

No steering program is attached: QEMU computes RSS in userspace, so this checks QEMU
and Linux against `vnetbackend.rss`, with QEMU's documented departures expected.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

import pytest

from tests.guest.conftest import RSS_GUEST_QUEUES, RssBed, need_guest
from vnetbackend.qemu.departures import ATOMIC_FRAGMENT, AUTH_HEADER_LENGTH, departures_for
from vnetbackend.rss import ALL_HASH_TYPES, HashReport, HashType
from vnetbackend.rss.vectors import MICROSOFT_KEY
from vnetbackend.testbed import frames as f
from vnetbackend.testbed.batch import (
    check_batch,
    departed,
    guest_verdicts,
    mismatches,
    observe_batch,
    report,
)
from vnetbackend.testbed.driver_issues import device_key
from vnetbackend.testbed.ethtool import FLOW_TYPES
from vnetbackend.testbed.traffic import Probe, make_batch, make_truncated_batch

pytestmark = [pytest.mark.guest, pytest.mark.asyncio(loop_scope="session")]

#: The types Linux's virtio_net enables by default (it never enables the _EX types).
DRIVER_TYPES = ALL_HASH_TYPES & ~(HashType.IP_EX | HashType.TCP_EX | HashType.UDP_EX)
CHOSEN_KEY = random.Random(7).randbytes(40)


@dataclass(frozen=True)
class GuestCase:
    name: str
    key: bytes | None  # None: the key the driver chose at boot
    equal: int | None = None
    weights: tuple[int, ...] | None = None
    flows: tuple[tuple[str, str], ...] = ()  # (flow, "sd") narrowings


CASES = [
    GuestCase("default-key", None, equal=RSS_GUEST_QUEUES),
    GuestCase("microsoft-key-equal-4", MICROSOFT_KEY, equal=4),
    GuestCase("chosen-key-equal-2", CHOSEN_KEY, equal=2),
    GuestCase("equal-3", MICROSOFT_KEY, equal=3),
    GuestCase("weighted", CHOSEN_KEY, weights=(1, 3, 0, 2)),
    GuestCase("udp4-tcp6-addresses-only", MICROSOFT_KEY, equal=4,
              flows=(("udp4", "sd"), ("tcp6", "sd"))),
    GuestCase("ipv4-addresses-only", CHOSEN_KEY, equal=3,
              flows=(("tcp4", "sd"), ("udp4", "sd"))),
]


def expected_types(case: GuestCase) -> HashType:
    mask = DRIVER_TYPES
    for flow, _ in case.flows:
        mask &= ~FLOW_TYPES[flow][0]
    return mask


async def apply(bed: RssBed, case: GuestCase) -> None:
    key = case.key if case.key is not None else bed.boot_config.key
    await bed.rss.set_rxfh(key, equal=case.equal, weights=case.weights)
    narrowed = dict(case.flows)
    for flow in FLOW_TYPES:
        await bed.rss.set_flow_hash(flow, narrowed.get(flow, "sdfn"))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
async def test_guest_hashes_and_queues_match_the_model(rss_bed: RssBed, case: GuestCase):
    need_guest()
    await apply(rss_bed, case)
    config = await rss_bed.rss.read_config()

    # The read-back configuration is the one set (else the comparison below proves little).
    assert config.key == device_key(case.key or rss_bed.boot_config.key,
                                    rss_bed.guest.kernel_release)
    assert config.hash_types == expected_types(case)
    used = set(config.indirection_table)
    if case.equal is not None:
        assert used == set(range(case.equal))
    else:
        assert case.weights is not None
        assert used == {q for q, w in enumerate(case.weights) if w}

    probes = make_batch(rss_bed.guest.mac, per_class=4, seed=zlib.crc32(case.name.encode()))
    failed = await check_batch(rss_bed.guest.tap_name, rss_bed.observer, config, probes,
                               departures_for(rss_bed.guest.qemu_version))
    assert not failed, report(config, failed)
    # Frames really spread over the table's queues.
    assert {config.steer(p.frame).queue for p in probes} == used


async def test_departures_occur_exactly_as_documented(rss_bed: RssBed):
    """With every driver hash type on, each documented departure changes some frames."""
    need_guest()
    await apply(rss_bed, GuestCase("departures", MICROSOFT_KEY, equal=RSS_GUEST_QUEUES))
    config = await rss_bed.rss.read_config()
    classes = ["ipv6_auth_header_tcp", "ipv6_atomic_fragment_udp"]
    probes = make_batch(rss_bed.guest.mac, per_class=8, seed=11, classes=classes)
    records = await observe_batch(rss_bed.guest.tap_name, rss_bed.observer, probes)
    verdicts = guest_verdicts(config, probes, records, departures_for(rss_bed.guest.qemu_version))
    counts = departed(verdicts)
    assert set(counts) == {AUTH_HEADER_LENGTH.name, ATOMIC_FRAGMENT.name}
    failed = mismatches(verdicts)
    assert not failed, report(config, failed)


def long_chain_probes(mac: bytes) -> list[Probe]:
    """IPv6 frames with long extension chains, and with destination option lists filling
    their header, before TCP and UDP: each frame of its own length."""
    rng = random.Random(5)
    src, dst = "2001:db8:5::1", "fd00:5::2"
    probes = []
    for index, count in enumerate((9, 12, 30, 64)):
        for l4 in (f.tcp, f.udp):
            ext = [f.hop_by_hop()] + [f.dest_options()] * (count - 1)
            packet = f.ipv6(src, dst, l4(rng.randrange(1, 1 << 16), 443, bytes(index)), ext=ext)
            probes.append(Probe(f"ipv6_chain_{count}", f.frame(packet, dst=mac)))
    for pad in (f.dest_options(b"\0" * 600 + bytes([0xC9, 16]) + bytes(16)),
                f.dest_options(bytes([1, 0]) * 300)):
        packet = f.ipv6(src, dst, f.tcp(rng.randrange(1, 1 << 16), 80), ext=[pad] * 2)
        probes.append(Probe("ipv6_full_option_lists", f.frame(packet, dst=mac)))
    assert len({(p.l3_len, p.ethertype) for p in probes}) == len(probes)
    return probes


async def test_long_chains_match_the_model(rss_bed: RssBed):
    """QEMU walks every extension header and option, as the model does: no departure."""
    need_guest()
    await apply(rss_bed, GuestCase("long-chains", MICROSOFT_KEY, equal=RSS_GUEST_QUEUES))
    config = await rss_bed.rss.read_config()
    probes = long_chain_probes(rss_bed.guest.mac)
    assert {config.steer(p.frame).report for p in probes} == {HashReport.TCPV6,
                                                              HashReport.UDPV6}
    records = await observe_batch(rss_bed.guest.tap_name, rss_bed.observer, probes)
    verdicts = guest_verdicts(config, probes, records, departures_for(rss_bed.guest.qemu_version))
    assert departed(verdicts) == {}
    failed = mismatches(verdicts)
    assert not failed, report(config, failed)


async def test_truncated_frames_match_the_model(rss_bed: RssBed):
    """Frames that end inside their transport header or an IPv6 extension header."""
    need_guest()
    await apply(rss_bed, GuestCase("truncated", CHOSEN_KEY, equal=RSS_GUEST_QUEUES))
    config = await rss_bed.rss.read_config()
    probes = make_truncated_batch(rss_bed.guest.mac, seed=4)
    reports = {config.steer(p.frame).report for p in probes}
    assert {HashReport.IPV4, HashReport.UDPV4, HashReport.IPV6, HashReport.TCPV6} <= reports
    failed = await check_batch(rss_bed.guest.tap_name, rss_bed.observer, config, probes,
                               departures_for(rss_bed.guest.qemu_version))
    assert not failed, report(config, failed)
