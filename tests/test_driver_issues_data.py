"""The guest drivers' known issues, held against QEMU's own device state.

A capture under ``tests/data/device-state/<qemu>/`` holds the stream QEMU wrote and,
beside it, the guest's own ``ethtool -x`` answer and (in captures taken since the guest
kernel can be chosen: the 10.0 ones, Linux 6.12) its kernel release: the key the device
holds must be `device_key` of the key the guest shows.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from vnetbackend.qemu.snapshot import DeviceState, read_device_state
from vnetbackend.testbed.driver_issues import (
    SHIFTED_RSS_KEY,
    STALE_MAX_TX_VQ,
    device_key,
    kernel_series,
)
from vnetbackend.testbed.ethtool import parse_rxfh

DATA = Path(__file__).parent / "data" / "device-state"


def _capture(path: Path) -> tuple[dict, DeviceState]:
    meta = json.loads(path.read_text())
    stream = gzip.decompress(path.with_name(path.stem + ".state.gz").read_bytes())
    return meta, read_device_state(stream, meta["pci_address"], tuple(meta["qemu_version"]),
                                   meta["max_queue_pairs"])


#: Captures of a booted guest steering by RSS, whose guest kernel the capture recorded.
GUEST_CAPTURES = sorted(
    path for path in DATA.glob("*/*.json")
    if "guest_kernel" in (meta := json.loads(path.read_text()))
    and "ethtool -x eth0" in meta.get("guest", {}).get("answers", {})
    and (rss := _capture(path)[1].rss) is not None and rss.redirect)


def test_there_are_captures_of_a_6_12_guest() -> None:
    kernels = {json.loads(path.read_text())["guest_kernel"] for path in GUEST_CAPTURES}
    assert any(SHIFTED_RSS_KEY.concerns(kernel) for kernel in kernels)


@pytest.mark.parametrize("path", GUEST_CAPTURES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_the_device_holds_the_key_device_key_says(path: Path) -> None:
    meta, state = _capture(path)
    assert state.rss is not None
    shown = parse_rxfh(meta["guest"]["answers"]["ethtool -x eth0"]["output"]).key
    assert state.rss.key == device_key(shown, meta["guest_kernel"])
    assert (state.rss.key == shown) == (not SHIFTED_RSS_KEY.concerns(meta["guest_kernel"]))


def test_kernel_series_reads_releases() -> None:
    assert kernel_series("6.12.95+deb12-amd64") == (6, 12)
    assert kernel_series("6.1.0-56-amd64") == (6, 1)
    assert kernel_series("garbage") is None
    assert STALE_MAX_TX_VQ.concerns("6.1.0-56-amd64")
    assert not STALE_MAX_TX_VQ.concerns("6.12.95+deb12-amd64")
