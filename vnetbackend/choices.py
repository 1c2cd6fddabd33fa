"""The command-line options that choose the QEMU and the test guest (``--qemu``,
``--guest-kernel``), shared by the commands and the benchmarks; what they name is
resolved by `vnetbackend.qemu.installs` and `vnetbackend.testbed.platform`."""

from __future__ import annotations

import argparse


def add_platform_options(parser: argparse.ArgumentParser, *, guest: bool) -> None:
    """``--qemu`` (and, for commands that boot the test guest, ``--guest-kernel``)."""
    parser.add_argument("--qemu", metavar="PATH|VERSION",
                        help="the QEMU binary, or a version among those installed "
                             "(e.g. 7.2, 10.0; default: $VNETBACKEND_QEMU, else the "
                             "qemu-system-x86_64 on PATH)")
    if guest:
        parser.add_argument("--guest-kernel", metavar="SERIES",
                            help="the test guest's kernel series, as scripts/setup built "
                                 "it (6.1, 6.12; default: $VNETBACKEND_GUEST_KERNEL, "
                                 "else 6.1)")
