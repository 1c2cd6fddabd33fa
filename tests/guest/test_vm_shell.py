"""``vnetbackend vm``: a person's shell in the test guest, with the daemon beside it."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from tests.guest.conftest import need_guest
from tests.prereq import need_bcc
from vnetbackend import tap
from vnetbackend.rss import ALL_HASH_TYPES, HashType, RssConfig
from vnetbackend.testbed.bed import wait_mirrored
from vnetbackend.testbed.driver_issues import device_key
from vnetbackend.testbed.ethtool import parse_rxfh
from vnetbackend.testbed.guest import unique_tap_name

pytestmark = pytest.mark.guest

TIMEOUT = 240.0
DRIVER_TYPES = ALL_HASH_TYPES & ~(HashType.IP_EX | HashType.TCP_EX | HashType.UDP_EX)


async def _read_until(stream: asyncio.StreamReader, pattern: re.Pattern[bytes],
                      seen: bytearray) -> re.Match[bytes]:
    """Read *stream* into *seen* until *pattern* matches what was read."""
    while (found := pattern.search(seen)) is None:
        chunk = await stream.read(4096)
        assert chunk, f"the stream ended before {pattern.pattern!r}: {bytes(seen)[-2000:]!r}"
        seen += chunk
    return found


async def test_vm_gives_a_shell_in_the_guest_and_the_daemon_follows_it(tmp_path: Path) -> None:
    need_guest()
    need_bcc()
    name = unique_tap_name()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vnetbackend.cli", "vm", "--tap", name, "--queues", "2",
        "--run-dir", str(tmp_path / "run"), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stdin and process.stdout and process.stderr
    try:
        async with asyncio.timeout(TIMEOUT):
            log = bytearray()
            release = (await _read_until(process.stderr, re.compile(rb"Linux (\S+) on QEMU"),
                                         log))[1].decode()
            monitor = (await _read_until(process.stderr,
                                         re.compile(rb"the daemon's monitor: (\S+)"), log))[1]
            # The shell computes what the marker says: an echo of the input would not.
            key = bytes(range(0x61, 0x61 + 40))
            process.stdin.write(
                b"ethtool -X eth0 hkey " + key.hex(":").encode() + b" equal 2; "
                b"ethtool -x eth0; echo VNET-SHELL-$((6*7))\n")
            shown = bytearray()
            await _read_until(process.stdout, re.compile(rb"VNET-SHELL-42"), shown)
            text = shown.decode(errors="replace").replace("\r", "")
            assert parse_rxfh(text[text.find("RX flow hash"):]).key == key
            client = QMPClient("test")
            await client.connect(monitor.decode())
            status = await client.execute("query-vnet")
            assert status["tap"] == name and status["qemu_version"]
            # The driver's default hash types, the key set, the table spread over 2 queues.
            await wait_mirrored(client, RssConfig(
                hash_types=DRIVER_TYPES, key=device_key(key, release),
                indirection_table=[0, 1] * 64, queues=2))
            await client.disconnect()
            process.stdin.write(b"\x1d")
            await process.stdin.drain()
            assert await process.wait() == 0, (await process.stderr.read()).decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert not tap.tap_exists(name)
