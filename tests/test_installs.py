"""Choosing a QEMU by version or path: each answer checked against what the chosen
binary itself says over QMP (``query-version``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.prereq import need
from vnetbackend.qemu.installs import QEMU_CHOICE_ENV, QemuNotFound, choose_qemu
from vnetbackend.qemu.process import QemuVersionUnknown


async def qmp_version(binary: str) -> tuple[int, int, int]:
    """The version *binary* reports over QMP, started bare and paused."""
    process = await asyncio.create_subprocess_exec(
        binary, "-machine", "none", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(process.communicate(
        b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'), 30)
    greeting = json.loads(out.splitlines()[0])["QMP"]["version"]["qemu"]
    return greeting["major"], greeting["minor"], greeting["micro"]


@pytest.mark.parametrize("wanted", ["7.2", "10.0"])
async def test_a_version_picks_a_qemu_of_that_version(wanted: str) -> None:
    try:
        qemu = await choose_qemu(wanted)
    except QemuNotFound as err:
        need(False, f"{err} (scripts/setup installs both)")
        raise
    assert ".".join(map(str, (await qmp_version(qemu.binary))[:2])) == wanted
    assert qemu.version == await qmp_version(qemu.binary)


async def test_the_environment_chooses_when_the_caller_does_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(QEMU_CHOICE_ENV, "7.2")
    assert (await choose_qemu()).version[:2] == (7, 2)
    assert (await choose_qemu("10.0")).version[:2] == (10, 0)


async def test_an_unknown_version_names_what_there_is() -> None:
    with pytest.raises(QemuNotFound, match=r"no QEMU 6\.0 .*there is: .*7\.2"):
        await choose_qemu("6.0")


async def test_a_path_that_is_no_qemu_is_refused(tmp_path: Path) -> None:
    with pytest.raises(QemuVersionUnknown, match="no-qemu-here"):
        await choose_qemu(str(tmp_path / "no-qemu-here"))
    with pytest.raises(QemuVersionUnknown, match="said"):
        await choose_qemu("/bin/true")
