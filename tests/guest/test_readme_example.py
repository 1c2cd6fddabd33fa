"""The README's "Use it in your own tests" example runs as written, outside the repository.

The test is taken from the README itself, written into an empty directory, and run by a
separate pytest with nothing of this repository's configuration: only the installed
package and its plugin (entry point ``pytest11``), against the QEMU of this session.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from tests.guest.conftest import need_guest
from tests.prereq import need_bcc
from vnetbackend.qemu.installs import choose_qemu

pytestmark = pytest.mark.guest

README = Path(__file__).resolve().parents[2] / "README.md"
_EXAMPLE = re.compile(r"<!-- example: (\S+) -->\n```python\n(.*?)```", re.S)


def test_the_readme_has_one_example_of_about_twenty_lines() -> None:
    examples = _EXAMPLE.findall(README.read_text())
    assert len(examples) == 1
    name, code = examples[0]
    assert name.startswith("test_") and 15 <= len(code.strip().splitlines()) <= 30


async def test_the_readme_example_passes_from_a_scratch_directory(tmp_path: Path) -> None:
    need_guest()
    need_bcc()
    ((name, code),) = _EXAMPLE.findall(README.read_text())
    scratch = tmp_path / "elsewhere"
    scratch.mkdir()
    (scratch / name).write_text(code)
    qemu = await choose_qemu()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pytest", name, "--vnet-qemu", qemu.binary, "-q",
        "-p", "no:cacheprovider", cwd=scratch, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), 600)
    assert process.returncode == 0, out.decode()[-4000:]
    assert b"1 passed" in out
