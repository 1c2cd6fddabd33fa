"""The daemon's guest side without a guest: a real program's reports, records on a socket.

A steering program run with BPF_PROG_TEST_RUN writes the reports; the records port is a
unix socket this test serves, carrying recorder lines for the same frames. Expected hashes
come from Microsoft's published verification vectors, queues from the table by hand.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.prereq import need_bcc
from vnetbackend.daemon.live_check import Hooks, LiveCheck
from vnetbackend.qemu.departures import DEPARTURES
from vnetbackend.rss import ALL_HASH_TYPES, RssConfig
from vnetbackend.rss.vectors import MICROSOFT_IPV4_VECTORS, MICROSOFT_KEY
from vnetbackend.steering import SteeringProgram, prog_test_run

TABLE = [q % 4 for q in range(128)]
CONFIG = RssConfig(hash_types=ALL_HASH_TYPES, key=MICROSOFT_KEY, indirection_table=TABLE,
                   queues=4)
UDP_LEN = 8 + 32


def udp_frame(vector: tuple) -> bytes:
    src, sport, dst, dport, _, _ = vector
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + UDP_LEN, 0, 0, 64, 17, 0,
                     ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    udp = struct.pack("!HHHH", sport, dport, UDP_LEN, 0) + bytes(32)
    return bytes(6) + bytes.fromhex("525400000001") + b"\x08\x00" + ip + udp


def record_line(seq: int, vector: tuple, wrong: bool) -> bytes:
    """What the guest's recorder writes for the frame of *vector* (``wrong``: a hash off
    by one bit, on the queue that hash would pick)."""
    src, sport, dst, dport, _, l4_hash = vector
    value = l4_hash ^ 1 if wrong else l4_hash
    addresses = [ipaddress.ip_address(a).packed.hex() for a in (src, dst)]
    return (f"r {seq} 0 {TABLE[value % 128] + 1} {value:08x} 1 0800 {20 + UDP_LEN} 4 17 "
            f"{sport} {dport} {addresses[0]} {addresses[1]} 0 28\n").encode()


@pytest.fixture(scope="module")
def program() -> Iterator[SteeringProgram]:
    need_bcc()
    with SteeringProgram(report_slots=1024) as loaded:
        yield loaded


async def consumed(live: LiveCheck, records: int) -> None:
    """Until the check has parsed *records* records."""
    async with asyncio.timeout(10):
        while live.parser.records < records:
            await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_wrong_guest_records_disagree_after_one_device_read_a_second(
        program: SteeringProgram, tmp_path: Path) -> None:
    program.apply(CONFIG)
    program.set_reports(1)
    program.report_rings().take_batch()
    loop = asyncio.get_running_loop()
    in_sync = asyncio.Event()
    in_sync.set()
    reads: list[float] = []
    events: list[tuple[str, dict[str, Any]]] = []

    def read_device() -> None:  # the daemon's sync: done at the loop's next turn
        reads.append(loop.time())
        in_sync.clear()
        loop.call_soon(in_sync.set)

    def configs_since(generation: int) -> list[RssConfig | None]:
        kept = [program.generation_of(n) for n in range(generation, program.generation + 1)]
        return [g.state.config for g in kept if g is not None]

    def read_reports() -> None:
        live.add_reports(program.report_rings().take_batch())

    hooks = Hooks(read_reports=read_reports, request_sync=read_device,
                  in_sync=in_sync.wait, configs_since=configs_since,
                  active_pairs=lambda: 4, rss_changes=lambda: 0,
                  detached_recently=lambda: False,
                  publish=lambda name, data: events.append((name, data)))
    connected: asyncio.Future[asyncio.StreamWriter] = loop.create_future()
    server = await asyncio.start_unix_server(
        lambda _, writer: connected.set_result(writer), str(tmp_path / "records.sock"))
    live = LiveCheck(tmp_path / "records.sock", hooks, DEPARTURES, sampled=False)
    await live.start()
    port = await connected
    port.write(b"h vnet-recorder 1 6.1.0-test eth0 200\n")
    vectors = MICROSOFT_IPV4_VECTORS
    seq = wrong = 0
    for round_ in range(6):  # six batches, each with one wrong record
        for index, vector in enumerate(vectors):
            assert prog_test_run(program.fd, udp_frame(vector)).retval == TABLE[
                vector[5] % 128]
            bad = index == round_ % len(vectors)
            port.write(record_line(seq, vector, bad))
            seq += 1
            wrong += bad
        await port.drain()
        await consumed(live, seq)
    port.write(b"p 1\np 2\n")
    await live.stop(settle=10)
    port.close()
    server.close()

    summary = live.summary()
    assert (summary["frames"], summary["agreed"], summary["disagreed"]) == (
        seq, seq - wrong, wrong)
    assert summary["unmatched"] == 0 and summary["pending-reports"] == 0
    # Held disagreements cost one device read at once, then none within the second:
    # the next is the one that ends the check.
    assert 1 <= len(reads) <= 2 + int((reads[-1] - reads[0]) // 1.0), reads
    mismatches = [data for name, data in events if name == "VNET_HASH_MISMATCH"]
    assert len(mismatches) == wrong and {m["source"] for m in mismatches} == {"guest"}
    assert [name for name, _ in events if name == "VNET_RECORDER_STARTED"] == [
        "VNET_RECORDER_STARTED"]
