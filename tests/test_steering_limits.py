"""The steering program does not compile while the Python side disagrees on a shared constant.

The loader's flags carry the Python value of every constant the C program shares (limits,
report flags, and the numbers the kernel's uapi headers define); the program checks each
with a static assert. Expected values come from the uapi headers bcc compiles against and
from the Python constants themselves.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.prereq import need, need_bcc
from vnetbackend.rss import frame, types
from vnetbackend.steering import layout
from vnetbackend.steering.layout import layout_defines
from vnetbackend.steering.program import SOURCE_PATH, SteeringError, SteeringProgram

#: The uapi headers the program includes.
UAPI_HEADERS = ("virtio_net.h", "if_ether.h", "in.h", "in6.h")
VIRTIO_PREFIXES = ("VIRTIO_NET_RSS_HASH_TYPE_", "VIRTIO_NET_HASH_REPORT_")

#: Shared constants no header defines: the Python value is the only source.
PYTHON_ONLY = {
    "MAX_KEY_SIZE": types.MAX_KEY_SIZE,
    "MAX_TABLE_LENGTH": types.MAX_TABLE_LENGTH,
    "MAX_HASH_INPUT": types.MAX_HASH_INPUT,
    "MAX_VLAN_TAGS": frame.MAX_VLAN_TAGS,
    "SLOT_COUNT": layout.SLOT_COUNT,
    "REPORT_FLAG_EXT_HEADERS": layout.REPORT_FLAG_EXT_HEADERS,
    "REPORT_FLAG_FRAGMENT": layout.REPORT_FLAG_FRAGMENT,
    "REPORT_FLAG_EX_SRC": layout.REPORT_FLAG_EX_SRC,
    "REPORT_FLAG_EX_DST": layout.REPORT_FLAG_EX_DST,
}

# `#define NAME 0x0800`, `#define NAME (1 << 3)` or an enum's `NAME = 6,`.
_CONSTANT = re.compile(
    r"^(?:#define\s+(\w+)\s+|\s*(\w+)\s*=\s*)(?:\(1 << (\d+)\)|(0x[0-9a-fA-F]+|\d+)\b)", re.M)
_PY_FLAG = re.compile(r"-DPY_(\w+)=(\d+)")


def _uapi_values() -> dict[str, int]:
    """The integer constants of the uapi headers the program includes, as bcc finds them."""
    modules = Path("/lib/modules") / os.uname().release
    values: dict[str, int] = {}
    for header in UAPI_HEADERS:
        found = [path for tree in ("build", "source")
                 if (path := modules / tree / "include/uapi/linux" / header).exists()]
        need(bool(found), f"needs the kernel's uapi header linux/{header} (scripts/setup)")
        for define, enum, shift, literal in _CONSTANT.findall(found[0].read_text()):
            values[define or enum] = 1 << int(shift) if shift else int(literal, 0)
    return values


def _passed(flags: list[str]) -> dict[str, int]:
    """Name -> value of each ``-DPY_<name>=<value>`` among *flags*."""
    return {m[1]: int(m[2]) for flag in flags if (m := _PY_FLAG.fullmatch(flag))}


def _compile(flags: list[str]) -> None:
    """Compile and verify the steering program with *flags*; bcc raises if either fails."""
    from bcc import BPF

    with BPF(text=SOURCE_PATH.read_text().encode(), cflags=flags) as bpf:
        bpf.load_func(b"steer", BPF.SOCKET_FILTER)


def _skewed(flags: list[str], names: set[str]) -> list[str]:
    """*flags* with the value of each ``PY_<name>`` in *names* one off."""
    passed = _passed(flags)
    return [f"-DPY_{m[1]}={passed[m[1]] + 1}"
            if (m := _PY_FLAG.fullmatch(flag)) and m[1] in names else flag
            for flag in flags]


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def _named(name: str, line: str) -> bool:
    return re.search(rf"\b{name}\b", line) is not None


def test_flags_carry_each_shared_constant_at_its_source_value() -> None:
    passed = _passed(layout_defines())
    uapi = _uapi_values()
    virtio = {name for name in uapi if name.startswith(VIRTIO_PREFIXES)}
    # Every hash type and report type of the header, and no other, has a Python twin.
    assert {name for name in passed if name.startswith(VIRTIO_PREFIXES)} == virtio
    from_headers = passed.keys() & uapi.keys()
    assert {n: passed[n] for n in from_headers} == {n: uapi[n] for n in from_headers}
    assert {n: passed.get(n) for n in PYTHON_ONLY} == PYTHON_ONLY
    assert passed.keys() == from_headers | PYTHON_ONLY.keys()


def test_the_loaders_flags_compile() -> None:
    need_bcc()
    _compile(layout_defines())


@pytest.mark.parametrize("name", [
    "MAX_KEY_SIZE", "VIRTIO_NET_RSS_HASH_TYPE_UDP_EX", "VIRTIO_NET_HASH_REPORT_IPv6",
])
def test_one_wrong_python_value_stops_the_compile_naming_it(
        name: str, capfd: pytest.CaptureFixture[str]) -> None:
    need_bcc()
    flags = layout_defines()
    assert name in _passed(flags)
    capfd.readouterr()
    with pytest.raises(Exception, match="Failed to compile"):
        _compile(_skewed(flags, {name}))
    errors = _errors(capfd.readouterr().err)
    assert len(errors) == 1, errors
    assert _named(name, errors[0]), errors[0]


def test_every_shared_value_is_checked(capfd: pytest.CaptureFixture[str]) -> None:
    """Skew them all in one compile: each must fail its own assert (no error limit)."""
    need_bcc()
    flags = layout_defines()
    names = set(_passed(flags))
    capfd.readouterr()
    with pytest.raises(Exception, match="Failed to compile"):
        _compile([*_skewed(flags, names), "-ferror-limit=0"])
    errors = _errors(capfd.readouterr().err)
    assert {n for n in names if not any(_named(n, e) for e in errors)} == set()
    assert len(errors) == len(names)


def test_the_loader_error_names_the_disagreeing_constant(tmp_path: Path) -> None:
    need_bcc()
    source = SOURCE_PATH.read_text()
    wrong = source.replace(f"#define MAX_VLAN_TAGS {frame.MAX_VLAN_TAGS}\n",
                           f"#define MAX_VLAN_TAGS {frame.MAX_VLAN_TAGS + 1}\n")
    assert wrong != source
    copy = tmp_path / SOURCE_PATH.name
    copy.write_text(wrong)
    with pytest.raises(SteeringError, match="Python disagrees on MAX_VLAN_TAGS"):
        SteeringProgram(source=copy)
