"""The daemon's QMP monitor, driven over real unix sockets by qemu.qmp and by raw bytes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, StateError

from vnetbackend.daemon.qmp_server import (
    MAX_MESSAGE_BYTES,
    MessageSplitter,
    Param,
    QmpCommandError,
    QmpServer,
    SocketInUse,
    VersionInfo,
)

TIMEOUT = 5.0
VERSION = VersionInfo(0, 1, 0, "vnetbackend 0.1.0")


class Daemon:
    """A server with test commands, recording what the handlers saw."""

    def __init__(self, path: Path, **limits: int) -> None:
        self.server = QmpServer(path, VERSION, **limits)
        self.calls: list[dict[str, Any]] = []
        self.blocked = asyncio.Event()
        self.release = asyncio.Event()
        self.unblocked = asyncio.Event()
        self.server.register("echo", self.echo, {
            "text": Param(str),
            "count": Param(int, required=False, minimum=1, maximum=10),
            "loud": Param(bool, required=False),
            "extra": Param(dict, required=False),
            "items": Param(list, required=False),
        })
        self.server.register("crash", self.crash)
        self.server.register("refuse", self.refuse)
        self.server.register("block", self.block)
        self.server.register("quit", self.quit)
        self.server.register("not-json", self.not_json, {"nan": Param(bool)})

    async def echo(self, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(args)
        text = args["text"] * args.get("count", 1)
        return {"text": text.upper() if args.get("loud") else text}

    async def crash(self, args: dict[str, Any]) -> None:
        raise RuntimeError("the steering map is gone")

    async def refuse(self, args: dict[str, Any]) -> None:
        raise QmpCommandError("no tap named vnet-x", "DeviceNotFound")

    async def block(self, args: dict[str, Any]) -> str:
        self.blocked.set()
        await self.release.wait()
        self.unblocked.set()
        return "released"

    async def quit(self, args: dict[str, Any]) -> None:
        await self.server.close()

    async def not_json(self, args: dict[str, Any]) -> Any:
        return {"value": float("nan")} if args["nan"] else {"value": {1, 2}}


class RawClient:
    """A client speaking bytes, to send what qemu.qmp never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: Path) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(path, limit=4 * MAX_MESSAGE_BYTES)
        client = cls(reader, writer)
        assert "QMP" in await client.recv()
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), TIMEOUT)
        assert line.endswith(b"\n"), f"connection ended: {line!r}"
        return json.loads(line)

    async def execute(self, name: str, message_id: Any = "raw") -> dict[str, Any]:
        await self.send(json.dumps({"execute": name, "id": message_id}).encode())
        return await self.recv()

    async def negotiate(self) -> None:
        assert await self.execute("qmp_capabilities") == {"return": {}, "id": "raw"}

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / f"qmp-{os.getpid()}.sock"


@pytest.fixture
async def daemon(sock_path: Path) -> AsyncIterator[Daemon]:
    daemon = Daemon(sock_path)
    async with daemon.server:
        yield daemon


@pytest.fixture
async def client(daemon: Daemon, sock_path: Path) -> AsyncIterator[QMPClient]:
    qmp = QMPClient("test")
    await asyncio.wait_for(qmp.connect(str(sock_path)), TIMEOUT)
    yield qmp
    await qmp.disconnect()


@pytest.fixture
async def raw(daemon: Daemon, sock_path: Path) -> AsyncIterator[RawClient]:
    raw = await RawClient.connect(sock_path)
    yield raw
    await raw.close()


async def execute(qmp: QMPClient, name: str, args: dict[str, Any] | None = None) -> Any:
    return await asyncio.wait_for(qmp.execute(name, args), TIMEOUT)


async def test_greeting_and_query_version(client: QMPClient) -> None:
    expected = {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "vnetbackend 0.1.0"}
    assert client.greeting is not None
    assert client.greeting.QMP.version == expected
    assert list(client.greeting.QMP.capabilities) == []
    assert await execute(client, "query-version") == expected


async def test_query_commands_lists_builtins_and_registered(client: QMPClient) -> None:
    names = {entry["name"] for entry in await execute(client, "query-commands")}
    assert names == {"qmp_capabilities", "query-commands", "query-version",
                     "echo", "crash", "refuse", "block", "quit", "not-json"}


async def test_registered_command_gets_its_arguments(client: QMPClient, daemon: Daemon) -> None:
    args = {"text": "ab", "count": 3, "loud": True, "extra": {"k": 1}, "items": [1]}
    assert await execute(client, "echo", args) == {"text": "ABABAB"}
    assert daemon.calls == [args]


async def test_many_clients_at_once(daemon: Daemon, sock_path: Path) -> None:
    clients = [QMPClient(f"many-{n}") for n in range(12)]
    await asyncio.wait_for(asyncio.gather(*(c.connect(str(sock_path)) for c in clients)),
                           TIMEOUT)
    try:
        replies = await asyncio.gather(*(execute(c, "echo", {"text": f"client {n}"})
                                         for n, c in enumerate(clients)))
        assert replies == [{"text": f"client {n}"} for n in range(len(clients))]
        assert daemon.server.client_count == len(clients)
    finally:
        await asyncio.gather(*(c.disconnect() for c in clients))


async def test_pipelined_commands_are_answered_in_order(client: QMPClient) -> None:
    replies = await asyncio.gather(*(execute(client, "echo", {"text": str(n)})
                                     for n in range(50)))
    assert replies == [{"text": str(n)} for n in range(50)]


async def test_only_qmp_capabilities_before_negotiation(raw: RawClient) -> None:
    reply = await raw.execute("query-version", 7)
    assert reply["id"] == 7
    assert reply["error"]["class"] == "CommandNotFound"
    assert "qmp_capabilities" in reply["error"]["desc"]
    await raw.negotiate()
    again = await raw.execute("qmp_capabilities", 8)
    assert again["id"] == 8
    assert again["error"]["class"] == "CommandNotFound"
    assert (await raw.execute("query-version"))["return"] == VERSION.to_qmp()


async def test_unoffered_capability_is_refused(raw: RawClient) -> None:
    await raw.send(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
    reply = await raw.recv()
    assert reply["error"]["class"] == "GenericError"
    assert '"oob"' in reply["error"]["desc"]
    assert (await raw.execute("query-version"))["error"]["class"] == "CommandNotFound"


async def test_unknown_command_is_command_not_found(client: QMPClient) -> None:
    with pytest.raises(ExecuteError) as caught:
        await execute(client, "no-such-command")
    assert caught.value.error_class == "CommandNotFound"
    assert "no-such-command" in str(caught.value)


@pytest.mark.parametrize(("args", "named"), [
    ({"text": "a", "bogus": 1}, "bogus"),
    ({}, "text"),
    ({"count": 2}, "text"),
    ({"text": 5}, "text"),
    ({"text": "a", "count": "2"}, "count"),
    ({"text": "a", "count": True}, "count"),
    ({"text": "a", "count": 2.0}, "count"),
    ({"text": "a", "count": 0}, "count"),
    ({"text": "a", "count": 11}, "count"),
    ({"text": "a", "loud": 1}, "loud"),
    ({"text": "a", "extra": []}, "extra"),
    ({"text": "a", "items": {}}, "items"),
])
async def test_bad_arguments_are_refused_before_the_handler(
        client: QMPClient, daemon: Daemon, args: dict[str, Any], named: str) -> None:
    with pytest.raises(ExecuteError) as caught:
        await execute(client, "echo", args)
    assert caught.value.error_class == "GenericError"
    assert f"'{named}'" in str(caught.value)
    assert daemon.calls == []


async def test_handler_exception_is_generic_error_and_serving_goes_on(
        client: QMPClient, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ExecuteError) as caught:
        await execute(client, "crash")
    assert caught.value.error_class == "GenericError"
    assert "the steering map is gone" in str(caught.value)
    assert "crash" in str(caught.value)
    failures = [r for r in caplog.records if r.name == "vnetbackend.qmp" and r.exc_info]
    assert len(failures) == 1
    assert await execute(client, "echo", {"text": "still here"}) == {"text": "still here"}


@pytest.mark.parametrize("nan", [False, True])
async def test_result_that_is_not_json_is_generic_error(client: QMPClient, nan: bool) -> None:
    with pytest.raises(ExecuteError) as caught:
        await execute(client, "not-json", {"nan": nan})
    assert caught.value.error_class == "GenericError"
    assert "not JSON" in str(caught.value)
    assert await execute(client, "query-version") == VERSION.to_qmp()


async def test_command_error_keeps_its_class(client: QMPClient) -> None:
    with pytest.raises(ExecuteError) as caught:
        await execute(client, "refuse")
    assert caught.value.error_class == "DeviceNotFound"
    assert str(caught.value) == "no tap named vnet-x"


@pytest.mark.parametrize("message_id", [0, "x", None, 1.5, [1, {"a": None}], {"k": [True]}])
async def test_ids_are_echoed_exactly(raw: RawClient, message_id: Any) -> None:
    await raw.negotiate()
    assert await raw.execute("query-version", message_id) == {
        "return": VERSION.to_qmp(), "id": message_id}
    failed = await raw.execute("no-such-command", message_id)
    assert failed["id"] == message_id


async def test_reply_without_id_when_none_was_sent(raw: RawClient) -> None:
    await raw.negotiate()
    await raw.send(b'{"execute": "query-version"}')
    assert await raw.recv() == {"return": VERSION.to_qmp()}


OVERSIZED = b"x" * (MAX_MESSAGE_BYTES + 1)


@pytest.mark.parametrize(("data", "desc_part", "echoed_id"), [
    (b'{"execute": "query-version",}\n', "JSON parse error", None),
    (b'{"execute" "query-version"}', "JSON parse error", None),
    (b"}\n", "JSON parse error", None),
    (b"[1, 2]", "not an array", None),
    (b"42\n", "not an integer", None),
    (b'"execute"', "not a string", None),
    (b"null\n", "not null", None),
    (b'{"id": 3}', "lacks 'execute'", 3),
    (b'{"execute": 1, "id": 4}', "'execute' must be a string", 4),
    (b'{"execute": "query-version", "exec-oob": "query-version", "id": 5}', "both", 5),
    (b'{"exec-oob": "query-version", "id": 6}', "out-of-band", 6),
    (b'{"execute": "query-version", "arguments": [], "id": 7}', "'arguments'", 7),
    (b'{"execute": "query-version", "bogus": 1, "id": 8}', "'bogus'", 8),
    (b'{"execute": "query-version", "id": "\xff"}', "not valid UTF-8", None),
    (b"\xfe\xff\n", "not valid UTF-8", None),
    (b"[" * 100 + b"]" * 100, "nested deeper", None),
    (b'{"execute": "echo", "arguments": {"text": "' + OVERSIZED + b'"}}', "longer than", None),
    (OVERSIZED + b"\n", "longer than", None),
    (b'{"execute": "query-version", "id": NaN}', "NaN is not a JSON value", None),
    (b'{"execute": "echo", "arguments": {"count": Infinity}}', "Infinity is not", None),
    (b'{"execute": "echo", "arguments": {"count": -Infinity}}', "-Infinity is not", None),
    (b'{"execute": "query-version", "id": ' + b"9" * 5000 + b"}", "5000 digits", None),
    (b'{"execute": "echo", "arguments": {"count": -' + b"1" * 21 + b"}}", "21 digits",
     None),
])
async def test_malformed_input_gets_one_error_then_the_connection_works(
        raw: RawClient, data: bytes, desc_part: str, echoed_id: Any) -> None:
    await raw.negotiate()
    await raw.send(data)
    reply = await raw.recv()
    assert reply["error"]["class"] == "GenericError"
    assert desc_part in reply["error"]["desc"]
    assert reply.get("id") == echoed_id
    assert ("id" in reply) == (echoed_id is not None)
    assert await raw.execute("query-version", "after") == {
        "return": VERSION.to_qmp(), "id": "after"}


async def test_messages_back_to_back_in_one_write(raw: RawClient) -> None:
    await raw.send(b'{"execute":"qmp_capabilities","id":1}{"execute":"query-version","id":2}'
                   b'  \n{"execute":"nope","id":3}')
    assert (await raw.recv())["id"] == 1
    assert await raw.recv() == {"return": VERSION.to_qmp(), "id": 2}
    assert (await raw.recv())["id"] == 3


def test_splitter_finds_the_same_messages_at_every_chunk_boundary() -> None:
    stream = (b'{"execute": "echo", "arguments": {"text": "a\\"}]{[ b\\\\"}, "id": [1]}'
              b' 42 "top\\"level" [] \n}\n{"x": {"y": ["z"]}}')
    expected: list[bytes | str] = [
        b'{"execute": "echo", "arguments": {"text": "a\\"}]{[ b\\\\"}, "id": [1]}',
        b"42", b'"top\\"level"', b"[]", b"}", b'{"x": {"y": ["z"]}}']
    for cut in range(len(stream) + 1):
        splitter = MessageSplitter()
        assert splitter.feed(stream[:cut]) + splitter.feed(stream[cut:]) == expected
    splitter = MessageSplitter()
    assert [m for byte in stream for m in splitter.feed(bytes([byte]))] == expected


def test_splitter_drops_oversized_and_deep_messages_and_resumes() -> None:
    splitter = MessageSplitter(max_bytes=16, max_nesting=3)
    out = splitter.feed(b'{"a": "' + b"b" * 40)
    out += splitter.feed(b'"} [[[[]]]] [[[]]] {"ok": 1}')
    assert out == ["message longer than 16 bytes", "message nested deeper than 3 levels",
                   b"[[[]]]", b'{"ok": 1}']


async def test_events_reach_every_negotiated_client(
        daemon: Daemon, client: QMPClient, sock_path: Path, raw: RawClient) -> None:
    second = QMPClient("second")
    await asyncio.wait_for(second.connect(str(sock_path)), TIMEOUT)
    try:
        before = time.time()
        daemon.server.emit("VNET_RSS_CHANGED", {"queues": 4})
        daemon.server.emit("VNET_READY")
        after = time.time()
        for qmp in (client, second):
            event = await asyncio.wait_for(qmp.events.get(), TIMEOUT)
            assert event["event"] == "VNET_RSS_CHANGED"
            assert event["data"] == {"queues": 4}
            stamp = event["timestamp"]
            assert 0 <= stamp["microseconds"] < 1_000_000
            assert before - 1e-6 <= stamp["seconds"] + stamp["microseconds"] / 1e6 <= after
            bare = await asyncio.wait_for(qmp.events.get(), TIMEOUT)
            assert bare["event"] == "VNET_READY"
            assert "data" not in bare
    finally:
        await second.disconnect()
    # The raw client had not negotiated: nothing was sent to it before this reply.
    await raw.negotiate()


async def test_client_that_never_reads_is_dropped_and_others_keep_up(sock_path: Path) -> None:
    loop = asyncio.get_running_loop()
    daemon = Daemon(sock_path, max_pending_output=64 << 10)
    async with daemon.server:
        # A bare socket, read only when asked to (a StreamReader would read eagerly).
        with socket.socket(socket.AF_UNIX) as sleeper:
            sleeper.setblocking(False)
            await loop.sock_connect(sleeper, str(sock_path))
            await loop.sock_sendall(sleeper, b'{"execute": "qmp_capabilities"}')
            reader = QMPClient("reader")
            await asyncio.wait_for(reader.connect(str(sock_path)), TIMEOUT)
            events = 320  # 5 MiB: beyond any socket buffer and the 64 KiB allowance
            for number in range(events):
                daemon.server.emit("BULK", {"n": number, "pad": "p" * (16 << 10)})
                event = await asyncio.wait_for(reader.events.get(), TIMEOUT)
                assert event["data"]["n"] == number
            received = bytearray()
            while chunk := await asyncio.wait_for(loop.sock_recv(sleeper, 1 << 16), TIMEOUT):
                received += chunk
        lines = received.split(b"\r\n")
        assert b"QMP" in lines[0]
        assert json.loads(lines[1]) == {"return": {}}
        bulk = [json.loads(line) for line in lines[2:-1]]
        assert [event["data"]["n"] for event in bulk] == list(range(len(bulk)))
        assert len(bulk) < events
        assert await execute(reader, "query-version") == VERSION.to_qmp()
        await reader.disconnect()


async def test_client_vanishing_mid_command_does_not_disturb_others(
        daemon: Daemon, client: QMPClient, sock_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    leaver = await RawClient.connect(sock_path)
    await leaver.negotiate()
    await leaver.send(b'{"execute": "block", "id": "gone"}')
    await asyncio.wait_for(daemon.blocked.wait(), TIMEOUT)
    await leaver.close()
    assert await execute(client, "echo", {"text": "meanwhile"}) == {"text": "meanwhile"}
    daemon.release.set()
    await asyncio.wait_for(daemon.unblocked.wait(), TIMEOUT)
    assert await execute(client, "query-version") == VERSION.to_qmp()
    assert daemon.server.client_count == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_slow_command_does_not_hold_up_other_clients(
        daemon: Daemon, client: QMPClient, raw: RawClient) -> None:
    await raw.negotiate()
    await raw.send(b'{"execute": "block", "id": "slow"}')
    await asyncio.wait_for(daemon.blocked.wait(), TIMEOUT)
    assert await execute(client, "echo", {"text": "fast"}) == {"text": "fast"}
    daemon.release.set()
    assert await raw.recv() == {"return": "released", "id": "slow"}


async def test_socket_is_private_and_removed_on_close(sock_path: Path) -> None:
    server = QmpServer(sock_path, VERSION)
    await server.start()
    mode = os.lstat(sock_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert os.listdir(sock_path.parent) == [sock_path.name]
    await server.close()
    assert not sock_path.exists()


async def test_stale_socket_is_replaced(sock_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))
    stale.close()
    stale_inode = os.lstat(sock_path).st_ino
    async with QmpServer(sock_path, VERSION):
        assert os.lstat(sock_path).st_ino != stale_inode
        qmp = QMPClient("after-stale")
        await asyncio.wait_for(qmp.connect(str(sock_path)), TIMEOUT)
        assert await execute(qmp, "query-version") == VERSION.to_qmp()
        await qmp.disconnect()


async def test_live_socket_is_refused(client: QMPClient, sock_path: Path) -> None:
    inode = os.lstat(sock_path).st_ino
    with pytest.raises(SocketInUse, match="listening"):
        await QmpServer(sock_path, VERSION).start()
    assert os.lstat(sock_path).st_ino == inode
    assert await execute(client, "query-version") == VERSION.to_qmp()


async def test_path_that_is_not_a_socket_is_refused(sock_path: Path) -> None:
    sock_path.write_text("keep me")
    with pytest.raises(SocketInUse, match="not a socket"):
        await QmpServer(sock_path, VERSION).start()
    assert sock_path.read_text() == "keep me"


async def test_close_disconnects_clients(daemon: Daemon, client: QMPClient) -> None:
    await daemon.server.close()
    with pytest.raises((ExecInterruptedError, StateError)):
        await execute(client, "query-version")
    with pytest.raises(EOFError):
        await client.disconnect()


async def test_close_cancels_running_commands(daemon: Daemon, raw: RawClient) -> None:
    await raw.negotiate()
    await raw.send(b'{"execute": "block", "id": "stuck"}')
    await asyncio.wait_for(daemon.blocked.wait(), TIMEOUT)
    await asyncio.wait_for(daemon.server.close(), TIMEOUT)
    assert await asyncio.wait_for(raw.reader.read(), TIMEOUT) == b""
    assert not daemon.unblocked.is_set()


async def test_quit_handler_may_close_the_server_and_still_reply(
        daemon: Daemon, raw: RawClient, sock_path: Path) -> None:
    await raw.negotiate()
    assert await raw.execute("quit") == {"return": {}, "id": "raw"}
    assert await asyncio.wait_for(raw.reader.read(), TIMEOUT) == b""
    assert not sock_path.exists()


def test_registration_errors() -> None:
    server = QmpServer("/nonexistent/qmp.sock", VERSION)

    async def handler(args: dict[str, Any]) -> None:
        return None

    with pytest.raises(ValueError, match="already registered"):
        server.register("query-version", handler)
    with pytest.raises(ValueError, match="one of"):
        Param(float)
    with pytest.raises(ValueError, match="int arguments only"):
        Param(str, minimum=1)


async def test_a_client_over_the_cap_gets_a_clear_error(sock_path: Path) -> None:
    daemon = Daemon(sock_path, max_clients=2)
    async with daemon.server:
        first, second = (await RawClient.connect(sock_path),
                         await RawClient.connect(sock_path))
        reader, writer = await asyncio.open_unix_connection(sock_path)
        refusal = json.loads(await asyncio.wait_for(reader.readline(), TIMEOUT))
        assert refusal["error"]["class"] == "GenericError"
        assert "too many clients: 2 are connected, at most 2" in refusal["error"]["desc"]
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
        await first.negotiate()
        await first.close()
        # A round trip on another connection: the server has seen the first one end (its
        # end of file reached the server before this request did).
        await second.negotiate()
        # Room again: a new client is greeted and served.
        third = await RawClient.connect(sock_path)
        await third.negotiate()
        await asyncio.gather(second.close(), third.close())
