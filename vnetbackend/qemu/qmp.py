"""QMP calls to a QEMU that is not trusted to answer, or to answer well.

Every call the daemon makes goes through `call`: it is bounded in time, and whatever
goes wrong (no answer in time, an error reply, the connection lost) comes out as one
`QemuCallFailed` naming the command. A reply whose shape is not what the command
documents is a `QemuReplyError` from `reply_field`, never a KeyError deep inside the
daemon.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, TypeVar

from qemu.qmp import QMPClient, QMPError

from vnetbackend.errors import VnetError

#: How long QEMU may take to answer one command. Commands that pause the VM take a few
#: milliseconds; a QEMU that needs more than this is treated as not answering.
QMP_TIMEOUT_S = 5.0

T = TypeVar("T")


class QemuCallFailed(VnetError):
    """A QMP command got no usable answer: ``command`` names it, the message says why."""

    def __init__(self, command: str, reason: str) -> None:
        super().__init__(f"QMP {command}: {reason}")
        self.command = command
        self.reason = reason


class QemuNotAnswering(QemuCallFailed):
    """QEMU did not answer within the timeout (stopped, hung, or overloaded)."""


class QemuReplyError(QemuCallFailed):
    """QEMU answered with something other than what the command documents."""


async def call(qmp: QMPClient, command: str, arguments: Mapping[str, object] | None = None,
               *, timeout: float = QMP_TIMEOUT_S) -> Any:
    """Execute *command*; its reply, or `QemuCallFailed` (`QemuNotAnswering` on time-out).

    A reply that arrives after the time-out is dropped by the client (its id is no longer
    awaited), so a late answer cannot be taken for the next command's. The time-out is an
    `asyncio.timeout` scope, not `asyncio.wait_for`: on Python 3.11 the latter can swallow
    a cancellation of the caller that coincides with the reply, leaving a task that was
    told to stop running on.
    """
    try:
        async with asyncio.timeout(timeout):
            return await qmp.execute(command, arguments)
    except TimeoutError:
        raise QemuNotAnswering(command, f"no answer within {timeout:g} s") from None
    except (QMPError, OSError, EOFError) as err:
        raise QemuCallFailed(command, str(err) or type(err).__name__) from err


def reply_field(reply: object, key: str, kind: type[T], command: str) -> T:
    """``reply[key]``, checked to be a *kind*; `QemuReplyError` naming the field if not."""
    if not isinstance(reply, dict) or key not in reply:
        raise QemuReplyError(command, f"reply has no {key!r}")
    value = reply[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise QemuReplyError(command, f"{key!r} is {value!r}, not {kind.__name__}")
    return value
