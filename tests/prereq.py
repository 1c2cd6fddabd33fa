"""Prerequisite checks: a missing prerequisite skips a test, except under CI=true where it fails."""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def need(condition: bool, reason: str) -> None:
    """Skip (fail when CI=true) the calling test unless *condition* holds."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root")


def need_tun() -> None:
    need_root()
    need(os.path.exists("/dev/net/tun"), "needs /dev/net/tun")


def need_bcc() -> None:
    need_root()
    try:
        import bcc  # noqa: F401
    except ImportError:
        need(False, "needs bcc (Debian python3-bpfcc)")
    need(os.path.exists(f"/lib/modules/{os.uname().release}/build/include"),
         "needs kernel headers linked for bcc (scripts/setup)")


def need_program(name: str) -> None:
    need(shutil.which(name) is not None, f"needs {name} on PATH")
