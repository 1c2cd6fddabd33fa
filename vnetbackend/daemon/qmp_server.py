"""The daemon's own QMP monitor: a unix-socket server speaking the QEMU Machine Protocol.

A client connects, reads the greeting, negotiates with ``qmp_capabilities`` and then runs
the commands the embedding daemon registered; it also receives the daemon's events. The
wire behaviour follows QEMU's monitor so that ``qemu.qmp.QMPClient`` and QEMU tooling work
unchanged:

- Messages are framed by JSON structure, not by lines: ``qemu.qmp`` writes its commands
  back to back with no separator. A bare top-level token (``42``) ends at whitespace.
- A command before negotiation, and ``qmp_capabilities`` after it, get ``CommandNotFound``.
- Input that is not valid JSON gets a ``GenericError`` reply without ``id``; a valid object
  that is not a well-formed command gets one that echoes its ``id``. Either way the
  connection carries on with the next message. JSON here is strict: ``NaN``,
  ``Infinity`` and integers of more than `MAX_INTEGER_DIGITS` digits (QMP's integers
  are 64-bit) are not JSON values and get that reply too.
- At most ``max_clients`` clients are served at once; one more gets a ``GenericError``
  saying so instead of the greeting, and is disconnected.
- Each client's commands run one at a time, in order. A client that disconnects while its
  command runs does not cancel it; the reply is dropped.
- Output is never awaited: replies and events are handed to the transport, and a client
  whose unread output exceeds ``max_pending_output`` is disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vnetbackend.errors import VnetError

log = logging.getLogger("vnetbackend.qmp")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]

MAX_MESSAGE_BYTES = 1 << 20
MAX_NESTING = 64
MAX_PENDING_OUTPUT = 4 << 20
MAX_CLIENTS = 16
#: Enough for any 64-bit integer, signed or not.
MAX_INTEGER_DIGITS = 20
_READ_CHUNK = 64 << 10
_MESSAGE_KEYS = frozenset({"execute", "arguments", "id"})
_TYPE_NAMES = {bool: "a boolean", int: "an integer", str: "a string", dict: "an object",
               list: "an array"}


class QmpCommandError(VnetError):
    """Raised by a command handler to fail the command with a QMP error reply."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


class SocketInUse(VnetError):
    """The monitor's socket path belongs to a live server or is not a socket."""


@dataclass(frozen=True)
class VersionInfo:
    """What the greeting and ``query-version`` report, in QEMU's shape."""

    major: int
    minor: int
    micro: int
    package: str

    def to_qmp(self) -> dict[str, Any]:
        return {"qemu": {"major": self.major, "minor": self.minor, "micro": self.micro},
                "package": self.package}


@dataclass(frozen=True)
class Param:
    """One declared command argument: its JSON type, whether it is required, int bounds."""

    type: type
    required: bool = True
    minimum: int | None = None
    maximum: int | None = None

    def __post_init__(self) -> None:
        if self.type not in _TYPE_NAMES:
            raise ValueError(f"argument type must be one of bool, int, str, dict, list, "
                             f"not {self.type!r}")
        if self.type is not int and (self.minimum is not None or self.maximum is not None):
            raise ValueError("bounds apply to int arguments only")

    def check(self, name: str, value: Any) -> None:
        """Raise QmpCommandError naming the argument if value does not fit."""
        # bool is a subclass of int in Python but a separate type in JSON.
        fits = isinstance(value, self.type) and (self.type is bool or not isinstance(value, bool))
        if not fits:
            raise QmpCommandError(f"argument '{name}' must be {_TYPE_NAMES[self.type]}")
        if self.minimum is not None and value < self.minimum:
            raise QmpCommandError(f"argument '{name}' must be at least {self.minimum}, "
                                  f"got {value}")
        if self.maximum is not None and value > self.maximum:
            raise QmpCommandError(f"argument '{name}' must be at most {self.maximum}, "
                                  f"got {value}")


@dataclass(frozen=True)
class _Command:
    handler: Handler
    params: Mapping[str, Param]

    def check_arguments(self, name: str, args: Mapping[str, Any]) -> None:
        for arg in args:
            if arg not in self.params:
                raise QmpCommandError(f"command '{name}' has no argument '{arg}'")
        for arg, param in self.params.items():
            if arg in args:
                param.check(arg, args[arg])
            elif param.required:
                raise QmpCommandError(f"command '{name}' needs argument '{arg}'")


# Bytes that matter outside a JSON string, and inside one.
_OUTSIDE_STRING = re.compile(rb'[\[\]{}"\s]')
_INSIDE_STRING = re.compile(rb'["\\]')


class MessageSplitter:
    """Cuts a byte stream into top-level JSON texts by bracket structure.

    ``feed`` returns, in order, each complete text as bytes, or a str describing why a
    text was dropped (longer than ``max_bytes``, or nested deeper than ``max_nesting``).
    Dropped texts are not stored, so memory stays bounded whatever a client sends.
    """

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES, max_nesting: int = MAX_NESTING):
        self._max_bytes = max_bytes
        self._max_nesting = max_nesting
        self._held = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._bare_token = False
        self._dropped: str | None = None

    def feed(self, data: bytes) -> list[bytes | str]:
        out: list[bytes | str] = []
        start = pos = 0
        while pos < len(data):
            if self._escape:
                self._escape = False
                pos += 1
            elif self._in_string:
                match = _INSIDE_STRING.search(data, pos)
                if match is None:
                    break
                pos = match.end()
                if match.group() == b"\\":
                    self._escape = True
                else:
                    self._in_string = False
                    if self._depth == 0:
                        start = self._finish(out, data, start, pos)
            else:
                match = _OUTSIDE_STRING.search(data, pos)
                at = match.start() if match else len(data)
                if self._depth == 0 and at > pos:
                    self._bare_token = True
                if match is None:
                    break
                byte = match.group()
                if self._depth == 0 and self._bare_token:
                    start = self._finish(out, data, start, at)
                pos = at + 1
                if byte.isspace():
                    if self._depth == 0:
                        start = pos
                elif byte == b'"':
                    self._in_string = True
                elif byte in b"[{":
                    self._depth += 1
                    if self._depth > self._max_nesting and self._dropped is None:
                        self._dropped = f"message nested deeper than {self._max_nesting} levels"
                elif self._depth == 0:
                    start = self._finish(out, data, start, pos)  # a stray closing bracket
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        start = self._finish(out, data, start, pos)
        self._hold(data[start:])
        return out

    def _hold(self, piece: bytes) -> None:
        if self._dropped is None and len(self._held) + len(piece) > self._max_bytes:
            self._dropped = f"message longer than {self._max_bytes} bytes"
        if self._dropped is None:
            self._held += piece
        else:
            self._held.clear()

    def _finish(self, out: list[bytes | str], data: bytes, start: int, end: int) -> int:
        self._hold(data[start:end])
        out.append(bytes(self._held) if self._dropped is None else self._dropped)
        self._held.clear()
        self._dropped = None
        self._bare_token = False
        return end


def _error(error_class: str, desc: str, echo: Mapping[str, Any] | None = None) -> bytes:
    """An encoded error reply; echo holds the request's id, if it had one."""
    return _encode({"error": {"class": error_class, "desc": desc}, **(echo or {})})


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise ValueError(f"integer of {len(text.lstrip('-'))} digits is out of range "
                         f"(at most {MAX_INTEGER_DIGITS})")
    return int(text)


def _decode(raw: bytes) -> Any:
    """*raw* as strict JSON; ValueError (with the reason) for anything else."""
    return json.loads(raw.decode(), parse_constant=_no_constant, parse_int=_bounded_int)


def _encode(message: Mapping[str, Any]) -> bytes:
    """One line of strict JSON (no NaN or Infinity), as QMP sends each message."""
    return json.dumps(message, allow_nan=False).encode() + b"\r\n"


class _Client:
    """One connection: its negotiation state and its bounded output."""

    def __init__(self, number: int, writer: asyncio.StreamWriter, max_pending: int) -> None:
        self.name = f"client {number}"
        self.negotiated = False
        self._writer = writer
        self._max_pending = max_pending

    def send(self, payload: bytes) -> None:
        """Queue payload without waiting; drop the client if it stopped reading."""
        transport = self._writer.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() > self._max_pending:
            log.warning("%s: more than %d bytes unread, disconnecting", self.name,
                        self._max_pending)
            transport.abort()
            return
        transport.write(payload)


class QmpServer:
    """A QMP monitor on a unix socket (mode 0600), serving many clients at once."""

    def __init__(self, path: str | os.PathLike[str], version: VersionInfo, *,
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 max_pending_output: int = MAX_PENDING_OUTPUT,
                 max_clients: int = MAX_CLIENTS) -> None:
        self.path = os.fspath(path)
        self.version = version
        self._max_message_bytes = max_message_bytes
        self._max_pending_output = max_pending_output
        self._max_clients = max_clients
        self._commands: dict[str, _Command] = {}
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._socket_id: tuple[int, int] | None = None
        self._closing = False
        self._accepted = 0
        self.register("qmp_capabilities", self._qmp_capabilities,
                      {"enable": Param(list, required=False)})
        self.register("query-commands", self._query_commands)
        self.register("query-version", self._query_version)

    def register(self, name: str, handler: Handler,
                 params: Mapping[str, Param] | None = None) -> None:
        """Make ``name`` a command; handler(args) runs only with arguments that fit params."""
        if name in self._commands:
            raise ValueError(f"command '{name}' is already registered")
        self._commands[name] = _Command(handler, dict(params or {}))

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def emit(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        """Send an event to every negotiated client, now; never waits on any of them.

        Raises TypeError or ValueError if data is not JSON (no NaN or Infinity either).
        """
        seconds, microseconds = divmod(time.time_ns() // 1000, 1_000_000)
        event: dict[str, Any] = {"event": name}
        if data is not None:
            event["data"] = data
        event["timestamp"] = {"seconds": seconds, "microseconds": microseconds}
        payload = _encode(event)
        for client in list(self._clients):
            if client.negotiated:
                client.send(payload)

    async def start(self) -> None:
        sock = _listen_privately(self.path)
        info = os.stat(self.path)
        self._socket_id = (info.st_dev, info.st_ino)
        try:
            self._server = await asyncio.start_unix_server(self._accept, sock=sock)
        except BaseException:
            sock.close()
            self._remove_socket()
            raise
        log.info("QMP monitor listening on %s", self.path)

    async def close(self) -> None:
        """Stop listening, disconnect every client and remove the socket file.

        Commands still running are cancelled, except the caller's own: a handler may call
        this (a ``quit`` command) and its reply is still sent before its client is closed.
        """
        self._closing = True
        if self._server is not None:
            self._server.close()
        self._remove_socket()
        current = asyncio.current_task()
        others = [task for task in self._tasks if task is not current]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> QmpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _remove_socket(self) -> None:
        """Unlink the socket file, unless it was replaced by someone else's."""
        with contextlib.suppress(FileNotFoundError):
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._socket_id:
                os.unlink(self.path)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._accepted += 1
        if len(self._clients) >= self._max_clients:
            log.warning("client %d refused: %d clients already connected", self._accepted,
                        len(self._clients))
            writer.write(_error("GenericError", f"too many clients: {len(self._clients)} "
                                                f"are connected, at most {self._max_clients}"))
            writer.close()
            return
        client = _Client(self._accepted, writer, self._max_pending_output)
        self._clients.add(client)  # counted from now: the next accept sees it
        task = asyncio.create_task(self._serve(client, reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, client: _Client, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        log.debug("%s connected", client.name)
        splitter = MessageSplitter(self._max_message_bytes)
        try:
            client.send(_encode({"QMP": {"version": self.version.to_qmp(), "capabilities": []}}))
            while not self._closing and (data := await reader.read(_READ_CHUNK)):
                for message in splitter.feed(data):
                    if isinstance(message, str):
                        client.send(_error("GenericError", f"{message}, ignored"))
                    else:
                        client.send(await self._execute(client, message))
                    if self._closing:
                        break
        except OSError as err:
            log.debug("%s: %s", client.name, err)
        except Exception:
            log.exception("%s: connection failed", client.name)
        finally:
            self._clients.discard(client)
            writer.close()
            log.debug("%s disconnected", client.name)

    async def _execute(self, client: _Client, raw: bytes) -> bytes:
        """Run one framed message and return the encoded reply."""
        try:
            message = _decode(raw)
        except UnicodeDecodeError as err:
            return _error("GenericError", f"message is not valid UTF-8 (byte {err.start})")
        except ValueError as err:  # JSONDecodeError, NaN, Infinity, an over-long integer
            return _error("GenericError", f"JSON parse error: {err}")
        if not isinstance(message, dict):
            kind = "null" if message is None else _TYPE_NAMES.get(type(message), "a number")
            return _error("GenericError", f"a QMP message must be a JSON object, not {kind}")
        echo = {"id": message["id"]} if "id" in message else {}
        try:
            result = await self._run_command(client, message)
        except QmpCommandError as err:
            return _error(err.error_class, err.desc, echo)
        try:
            return _encode({"return": result, **echo})
        except (TypeError, ValueError) as err:
            log.error("command '%s' returned a value that is not JSON: %s",
                      message["execute"], err)
            return _error("GenericError", f"command '{message['execute']}' returned a value "
                                          f"that is not JSON: {err}", echo)

    async def _run_command(self, client: _Client, message: dict[str, Any]) -> Any:
        if "exec-oob" in message:
            if "execute" in message:
                raise QmpCommandError("message has both 'execute' and 'exec-oob'")
            raise QmpCommandError("out-of-band execution ('exec-oob') is not offered")
        for key in message:
            if key not in _MESSAGE_KEYS:
                raise QmpCommandError(f"unexpected member '{key}' in QMP message")
        name = message.get("execute")
        if name is None:
            raise QmpCommandError("QMP message lacks 'execute'")
        if not isinstance(name, str):
            raise QmpCommandError("'execute' must be a string")
        args = message.get("arguments", {})
        if not isinstance(args, dict):
            raise QmpCommandError("'arguments' must be an object")
        if not client.negotiated and name != "qmp_capabilities":
            raise QmpCommandError("capabilities not negotiated yet: send 'qmp_capabilities' "
                                  "first", "CommandNotFound")
        if client.negotiated and name == "qmp_capabilities":
            raise QmpCommandError("capabilities are already negotiated", "CommandNotFound")
        command = self._commands.get(name)
        if command is None:
            raise QmpCommandError(f"command '{name}' not found", "CommandNotFound")
        command.check_arguments(name, args)
        log.debug("%s: executing %s", client.name, name)
        try:
            result = await command.handler(args)
        except QmpCommandError:
            raise
        except Exception as err:
            log.exception("command '%s' failed", name)
            raise QmpCommandError(f"command '{name}' failed: {type(err).__name__}: {err}") \
                from err
        if name == "qmp_capabilities":
            client.negotiated = True
        return {} if result is None else result

    async def _qmp_capabilities(self, args: dict[str, Any]) -> None:
        requested = args.get("enable", [])
        if requested:
            raise QmpCommandError(f"capability {json.dumps(requested[0])} is not offered")

    async def _query_commands(self, args: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": name} for name in self._commands]

    async def _query_version(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.version.to_qmp()


def _listen_privately(path: str) -> socket.socket:
    """Bind a unix socket at path that is never reachable with wider permissions than 0600.

    The socket is bound inside a fresh 0700 directory beside path, set to 0600 there, then
    hard-linked into place: link() fails if path exists, so two servers cannot both claim
    it. A stale socket (nobody listening) is removed first; anything else is refused.
    """
    _remove_if_stale(path)
    private_dir = tempfile.mkdtemp(prefix=".qmp-", dir=os.path.dirname(os.path.abspath(path)))
    bound = os.path.join(private_dir, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(bound)
        os.chmod(bound, 0o600)
        os.link(bound, path)
    except FileExistsError as err:
        sock.close()
        raise SocketInUse(f"{path} appeared while the monitor was starting") from err
    except BaseException:
        sock.close()
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(bound)
        os.rmdir(private_dir)
    sock.listen()
    sock.setblocking(False)
    return sock


def _remove_if_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            log.info("removed stale socket %s", path)
            return
        except BlockingIOError:
            pass  # listening, with a full backlog
    raise SocketInUse(f"another server is listening on {path}")
