"""The pytest plugin (entry point ``pytest11``): a guest under the daemon, for any test.

Fixtures:

``vnet_guest``
    A booted test guest with the daemon attached to its QEMU (`VnetGuest`): its agent and
    ethtool (``.rss``), an observer of what its driver receives, the daemon, a client on
    the daemon's monitor, ``.wait_mirrored()`` and ``.check_traffic()``. Set it up with
    ``@pytest.mark.vnet_guest(queues=4, qemu="10.0", guest_kernel="6.12", rss=True)``
    (every argument optional).
``vnet_platform``
    The QEMU and guest kernel chosen for the session: ``--vnet-qemu PATH|VERSION`` and
    ``--vnet-guest-kernel SERIES`` (else ``$VNETBACKEND_QEMU``,
    ``$VNETBACKEND_GUEST_KERNEL``, the QEMU on PATH and Linux 6.1).

Needs root, ``/dev/net/tun``, bcc with kernel headers, and the test guests
``scripts/setup`` builds: a test asking for ``vnet_guest`` where one is missing fails,
naming it. Each test gets its own guest (about 10 s to boot under TCG).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from vnetbackend.qemu.installs import QEMU_CHOICE_ENV
from vnetbackend.testbed.bed import VnetGuest, guest_under_daemon
from vnetbackend.testbed.image import GUEST_KERNEL_ENV
from vnetbackend.testbed.platform import Platform

MARKER = "vnet_guest"
_GUEST_SETTINGS = ("queues", "qemu", "guest_kernel", "cpus", "rss", "use_trace")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vnetbackend", "vnetbackend test guests")
    group.addoption("--vnet-qemu", metavar="PATH|VERSION",
                    help=f"the QEMU the test guests run on (default: ${QEMU_CHOICE_ENV}, "
                         "else qemu-system-x86_64 on PATH)")
    group.addoption("--vnet-guest-kernel", metavar="SERIES",
                    help=f"the test guests' kernel series, 6.1 or 6.12 (default: "
                         f"${GUEST_KERNEL_ENV}, else 6.1)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(queues=4, qemu=None, guest_kernel=None, cpus=None, rss=True, "
                   "use_trace=True): how the vnet_guest fixture boots its guest")
    # The choice goes to the environment, so that everything the session starts (the
    # daemon as a child process, the test bed's own boots) runs on the same platform.
    for option, variable in (("--vnet-qemu", QEMU_CHOICE_ENV),
                             ("--vnet-guest-kernel", GUEST_KERNEL_ENV)):
        value = config.getoption(option)
        if value:
            os.environ[variable] = value


def _missing_prerequisites() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun")
    if importlib.util.find_spec("bcc") is None:
        missing.append("bcc (Debian's python3-bpfcc, in a venv with system site packages)")
    if not os.path.exists(f"/lib/modules/{os.uname().release}/build/include"):
        missing.append("kernel headers linked for bcc (scripts/setup)")
    return missing


@pytest.fixture(scope="session")
def vnet_platform() -> Platform:
    """The session's QEMU and guest kernel choice."""
    return Platform(os.environ.get(QEMU_CHOICE_ENV), os.environ.get(GUEST_KERNEL_ENV))


@pytest_asyncio.fixture
async def vnet_guest(request: pytest.FixtureRequest, vnet_platform: Platform,
                     tmp_path: Path) -> AsyncIterator[VnetGuest]:
    marker = request.node.get_closest_marker(MARKER)
    settings = dict(marker.kwargs) if marker else {}
    unknown = set(settings) - set(_GUEST_SETTINGS)
    if unknown or (marker and marker.args):
        raise pytest.UsageError(f"@pytest.mark.{MARKER} takes keyword arguments "
                                f"{', '.join(_GUEST_SETTINGS)}; got {marker.args if marker else ()}"
                                f" {sorted(unknown)}")
    missing = _missing_prerequisites()
    if missing:
        pytest.fail(f"vnet_guest needs {', '.join(missing)}", pytrace=False)
    platform = Platform(settings.pop("qemu", vnet_platform.qemu),
                        settings.pop("guest_kernel", vnet_platform.guest_kernel))
    async with guest_under_daemon(tmp_path, platform=platform, **settings) as guest:
        yield guest
