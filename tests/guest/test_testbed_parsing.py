"""The bed's parsers, builders and command line, without booting anything."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.oracle import toeplitz_oracle
from vnetbackend.qemu.departures import (
    ATOMIC_FRAGMENT,
    AUTH_HEADER_LENGTH,
    DEPARTURES,
    EX_WITHOUT_EXTENSION_HEADERS,
    EXTENSION_HEADER_CUT_BEFORE_LENGTH,
    Kind,
    departures_for,
    find_departure,
)
from vnetbackend.qemu.features import (
    HASH_REPORT,
    RSS,
    Negotiation,
    VirtioFeatures,
    feature_names,
)
from vnetbackend.rss import HashReport, HashType, RssConfig, parse_frame, toeplitz
from vnetbackend.rss.vectors import MICROSOFT_KEY
from vnetbackend.testbed import frames as f
from vnetbackend.testbed.ethtool import (
    EthtoolFormatError,
    hash_types_from_flows,
    parse_combined_channels,
    parse_flow_hash_fields,
    parse_rxfh,
)
from vnetbackend.testbed.observer import REDUCE_SED, TraceFormatError, parse_records
from vnetbackend.testbed.traffic import (
    FRAME_CLASSES,
    AuthHeader,
    make_batch,
    make_truncated_batch,
)
from vnetbackend.testbed.vm import LaunchError, VmSpec, qemu_command

RXFH = """RX flow hash indirection table for eth0 with 4 RX ring(s):
    0:      0     1     2     0     1     2     0     1
    8:      2     0     1     2     0     1     2     0
RSS hash key:
6d:5a:56:da:25:5b:0e:c2:41:67:25:3d:43:a3:8f:b0:d0:ca:2b:cb:ae:7b:30:b4:77:cb:2d:a3:80:30:f2:0c:6a:42:b7:3b:be:ac:01:fa
RSS hash function:
    toeplitz: on
    xor: off
    crc32: off
"""
CHANNELS = """Channel parameters for eth0:
Pre-set maximums:
RX:\t\tn/a
TX:\t\tn/a
Other:\t\tn/a
Combined:\t4
Current hardware settings:
RX:\t\tn/a
TX:\t\tn/a
Other:\t\tn/a
Combined:\t2
"""
TCP4_SDFN = """TCP over IPV4 flows use these fields for computing Hash flow key:
IP SA
IP DA
L4 bytes 0 & 1 [TCP/UDP src port]
L4 bytes 2 & 3 [TCP/UDP dst port]
"""
UDP4_SD = """UDP over IPV4 flows use these fields for computing Hash flow key:
IP SA
IP DA
"""
TRACE_LINE = ("          <idle>-0       [000] ..s1.     2.313678: napi_gro_receive_entry: "
              "dev=eth0 napi_id=0x2001 queue_mapping=3 skbaddr=(____ptrval____) vlan_tagged=0 "
              "vlan_proto=0x0000 vlan_tci=0x0000 protocol=0x8100 ip_summed=0 hash=0x075b93a7 "
              "l4_hash=1 len=44 data_len=0 truesize=1280 mac_header_valid=1 mac_header=-14 "
              "nr_frags=0 gso_size=0 gso_type=0x0\n")
MAC = bytes.fromhex("5254005a4e01")


def test_rxfh_key_table_and_rings():
    rxfh = parse_rxfh(RXFH)
    assert rxfh.key == MICROSOFT_KEY
    assert rxfh.table == tuple(i % 3 for i in range(16))
    assert rxfh.rings == 4


def test_rxfh_rejects_rows_out_of_order_and_missing_key():
    rows = RXFH.splitlines()
    with pytest.raises(EthtoolFormatError):
        parse_rxfh("\n".join([rows[0], rows[2], rows[1], *rows[3:]]))
    with pytest.raises(EthtoolFormatError):
        parse_rxfh("\n".join(rows[:3]))


def test_channels_and_flow_hash_fields():
    assert parse_combined_channels(CHANNELS) == (4, 2)
    with pytest.raises(EthtoolFormatError):
        parse_combined_channels("Combined:\t4\n")
    sdfn, sd = parse_flow_hash_fields(TCP4_SDFN), parse_flow_hash_fields(UDP4_SD)
    types = hash_types_from_flows({"tcp4": sdfn, "udp4": sd, "tcp6": sdfn, "udp6": sdfn})
    assert types == HashType.IPV4 | HashType.TCPV4 | HashType.IPV6 | HashType.TCPV6 \
        | HashType.UDPV6
    with pytest.raises(EthtoolFormatError):
        hash_types_from_flows({"tcp4": frozenset({"IP SA"}), "udp4": sd, "tcp6": sd,
                               "udp6": sd})


def test_guest_sed_reduces_a_real_trace_line_to_a_record():
    reduced = subprocess.run(["sed", "-n", REDUCE_SED], input=TRACE_LINE + "# comment\n",
                             capture_output=True, text=True, check=True).stdout
    [record] = parse_records(reduced)
    assert (record.queue, record.protocol, record.hash, record.l4_hash, record.l3_len) == (
        2, 0x8100, 0x075B93A7, True, 44)
    with pytest.raises(TraceFormatError):
        parse_records("1 0x0800 0x12 1\n")
    with pytest.raises(TraceFormatError):
        parse_records("0 0x0800 0x12 1 60\n")


def test_batches_have_distinct_lengths_and_repeat_with_their_seed():
    batch = make_batch(MAC, per_class=3, seed=5)
    assert len(batch) == 3 * len(FRAME_CLASSES)
    assert len({p.l3_len for p in batch}) == len(batch)
    assert all(p.frame[:6] == MAC for p in batch)
    assert [p.frame for p in make_batch(MAC, per_class=3, seed=5)] == [p.frame for p in batch]
    assert make_batch(MAC, per_class=3, seed=6)[0].frame != batch[0].frame
    with pytest.raises(ValueError, match="unknown frame classes"):
        make_batch(MAC, classes=["ipv5"])


def test_truncated_batch_cuts_inside_the_headers_with_distinct_lengths():
    batch = make_truncated_batch(MAC, seed=1)
    assert len({(p.l3_len, p.ethertype) for p in batch}) == len(batch)
    config = RssConfig(hash_types=0x3F, key=MICROSOFT_KEY, indirection_table=range(4),
                       queues=4)
    for probe in batch:
        report = config.steer(probe.frame).report
        if "_tcp" in probe.frame_class and probe.frame_class.startswith("ipv4"):
            assert report is HashReport.IPV4  # never a whole TCP header
        if "_ext_" in probe.frame_class:
            assert report is HashReport.IPV6


def test_each_departure_recognises_only_its_class():
    """Under the Linux driver's hash types (0x3f, no _EX) each frame-borne departure
    recognises its own class only, and the _EX one none."""
    config = RssConfig(hash_types=0x3F, key=MICROSOFT_KEY, indirection_table=range(4),
                       queues=4)
    owners = {AUTH_HEADER_LENGTH: "ipv6_auth_header_tcp",
              ATOMIC_FRAGMENT: "ipv6_atomic_fragment_udp",
              EX_WITHOUT_EXTENSION_HEADERS: None,
              EXTENSION_HEADER_CUT_BEFORE_LENGTH: None}
    assert set(owners) == set(DEPARTURES)
    for probe in make_batch(MAC, per_class=4, seed=3):
        for departure, owner in owners.items():
            assert departure.recognises(config, probe.frame) == (probe.frame_class == owner), (
                departure.name, probe.frame_class)


def test_departures_are_told_apart_by_kind_and_version():
    assert AUTH_HEADER_LENGTH.kind is Kind.DEPARTS
    assert {ATOMIC_FRAGMENT.kind, EX_WITHOUT_EXTENSION_HEADERS.kind} == {Kind.SPEC_OPEN}
    assert EXTENSION_HEADER_CUT_BEFORE_LENGTH.kind is Kind.SPEC_OPEN
    assert set(departures_for((10, 0, 2))) == set(DEPARTURES)
    assert set(departures_for((7, 2, 22))) == set(DEPARTURES) - {
        EXTENSION_HEADER_CUT_BEFORE_LENGTH}
    assert departures_for((8, 1, 0)) == ()


def test_only_frames_cut_before_an_extension_length_are_recognised():
    config = RssConfig(hash_types=0x3F, key=MICROSOFT_KEY, indirection_table=range(4),
                       queues=4)
    for probe in make_truncated_batch(MAC, seed=4):
        cut_one_byte_in = (probe.ethertype == 0x86DD and probe.frame[14 + 6] == 0
                           and probe.l3_len == 41)
        assert EXTENSION_HEADER_CUT_BEFORE_LENGTH.recognises(config, probe.frame) == (
            cut_one_byte_in), probe.frame.hex()


@pytest.mark.parametrize("types", [HashType.TCPV6 | HashType.TCP_EX | HashType.IPV6,
                                   HashType.TCP_EX | HashType.IPV6])
def test_ex_types_on_ipv6_without_extension_headers(types: HashType):
    """The model's reading: the _EX types concern only packets with extension headers,
    so a plain IPv6 TCP packet is hashed by TCPv6 (or, without it, IPv6). QEMU's, from its
    source: the _EX bit alone gives TCPv6_EX over addresses and ports. Expected hashes
    come from the bit-by-bit oracle."""
    src, dst = "2001:db8::1", "2001:db8::2"
    frame = f.frame(f.ipv6(src, dst, f.tcp(1234, 80)), dst=MAC)
    config = RssConfig(hash_types=types, key=MICROSOFT_KEY, indirection_table=range(4),
                       queues=4)
    addresses = f.ip_bytes(src, 6) + f.ip_bytes(dst, 6)
    ports = bytes.fromhex("04d20050")
    model = config.steer(frame)
    if types & HashType.TCPV6:
        assert (model.report, model.hash) == (HashReport.TCPV6,
                                              toeplitz_oracle(MICROSOFT_KEY, addresses + ports))
    else:
        assert (model.report, model.hash) == (HashReport.IPV6,
                                              toeplitz_oracle(MICROSOFT_KEY, addresses))
    assert find_departure(config, frame, parse_frame(frame)) is EX_WITHOUT_EXTENSION_HEADERS
    qemu = EX_WITHOUT_EXTENSION_HEADERS.qemu_steer(config, frame)
    assert (qemu.report, qemu.hash) == (HashReport.TCPV6_EX,
                                        toeplitz_oracle(MICROSOFT_KEY, addresses + ports))


def test_long_chains_are_no_departure():
    """QEMU walks the whole extension chain, as the specification does: the model's
    answer is QEMU's, ports hashed behind any number of headers."""
    src, dst = "2001:db8::1", "2001:db8::2"
    config = RssConfig(hash_types=0x3F, key=MICROSOFT_KEY, indirection_table=range(4),
                       queues=4)
    for count in (9, 12, 64):
        frame = f.frame(f.ipv6(src, dst, f.tcp(1234, 80), ext=[f.dest_options()] * count),
                        dst=MAC)
        steering = config.steer(frame)
        assert find_departure(config, frame, parse_frame(frame)) is None
        assert steering.report is HashReport.TCPV6
        assert steering.hash == toeplitz(MICROSOFT_KEY, f.ip_bytes(src, 6) + f.ip_bytes(dst, 6)
                                         + bytes.fromhex("04d20050"))
    for probe in make_batch(MAC, per_class=4, seed=3, classes=["ipv6_long_chain_tcp"]):
        assert find_departure(config, probe.frame, parse_frame(probe.frame)) is None
        assert config.steer(probe.frame).report is HashReport.TCPV6


def test_auth_header_departure_hashes_the_bytes_qemu_takes_for_ports():
    src, dst = "2001:db8::1", "2001:db8::2"
    packet = f.ipv6(src, dst, f.tcp(1234, 80, bytes(16)), ext=[AuthHeader()])
    frame = f.frame(packet, dst=MAC)
    tcp_start = 14 + 40 + 16  # AH of 16 bytes, length field 2
    config = RssConfig(hash_types=0x3F, key=MICROSOFT_KEY, indirection_table=range(4),
                       queues=4)
    steering = AUTH_HEADER_LENGTH.qemu_steer(config, frame)
    wrong_ports = frame[tcp_start + 8 : tcp_start + 12]  # AH + (2 + 1) * 8
    addresses = f.ip_bytes(src, 6) + f.ip_bytes(dst, 6)
    assert steering.hash == toeplitz(MICROSOFT_KEY, addresses + wrong_ports)
    assert steering.report.is_l4
    assert steering != config.steer(frame)


def _spec(tmp_path: Path, fds: tuple[int, ...], **kwargs: object) -> VmSpec:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"")
    return VmSpec(kernel=kernel, initrd=kernel, tap_fds=fds, run_dir=tmp_path, **kwargs)


@pytest.mark.parametrize("queues", [1, 2, 4, 8])
def test_command_line_for_each_queue_count(tmp_path: Path, queues: int):
    fds = tuple(range(100, 100 + queues))
    argv = qemu_command(_spec(tmp_path, fds), {"agent": 7, "control": 8, "qmp": 9})
    device = argv[argv.index("-device") + 1]
    assert f"vectors={2 * queues + 2}" in device.split(",")
    assert {"mq=on", "rss=on", "hash=on"} <= set(device.split(","))
    netdev = argv[argv.index("-netdev") + 1]
    assert f"fds={':'.join(map(str, fds))}" in netdev.split(",")
    assert "vhost=off" in netdev.split(",")
    assert "-S" in argv


def test_command_line_switches_rss_off_and_takes_extra_arguments(tmp_path: Path):
    spec = _spec(tmp_path, (100, 101), rss=False, hash_report=False,
                 extra_args=("-trace", "virtio_net_rss*", "-D", "/tmp/x"))
    argv = qemu_command(spec, {"agent": 7, "control": 8, "qmp": 9})
    device = argv[argv.index("-device") + 1].split(",")
    assert {"rss=off", "hash=off"} <= set(device)
    assert argv[-4:] == ["-trace", "virtio_net_rss*", "-D", "/tmp/x"]


def test_spec_check_names_the_bad_field(tmp_path: Path):
    read_fd, write_fd = os.pipe()
    os.close(write_fd)
    with pytest.raises(LaunchError, match="not open"):
        _spec(tmp_path, (write_fd,)).check()
    with pytest.raises(LaunchError, match=r"1\.\.8"):
        _spec(tmp_path, (read_fd,) * 9).check()
    with pytest.raises(LaunchError, match="mac"):
        _spec(tmp_path, (read_fd,), mac="52:54:00:XX:00:01").check()
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    with pytest.raises(LaunchError, match="too long for unix socket"):
        VmSpec(kernel=tmp_path / "vmlinuz", initrd=tmp_path / "vmlinuz", tap_fds=(read_fd,),
               run_dir=deep).check()
    os.close(read_fd)


def test_feature_names_and_negotiation_states():
    offered = feature_names(["VIRTIO_NET_F_RSS: RSS RX steering supported",
                             "VIRTIO_NET_F_HASH_REPORT: Hash reporting supported",
                             "VIRTIO_NET_F_MQ: Multiqueue"])
    assert offered == {RSS, HASH_REPORT, "VIRTIO_NET_F_MQ"}
    booting = VirtioFeatures(offered, frozenset(), frozenset())
    assert booting.state(RSS) is Negotiation.DRIVER_NOT_READY
    declined = VirtioFeatures(offered, frozenset({"VIRTIO_NET_F_MQ"}),
                              frozenset({"VIRTIO_CONFIG_S_FEATURES_OK"}))
    assert declined.state(RSS) is Negotiation.DECLINED
    assert declined.state("VIRTIO_NET_F_MQ") is Negotiation.NEGOTIATED
    assert declined.state("VIRTIO_NET_F_CTRL_VQ") is Negotiation.NOT_OFFERED
