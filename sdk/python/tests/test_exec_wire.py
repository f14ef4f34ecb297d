"""sandbox.exec: session start/list/kill requests and the WebSocket output stream."""

from __future__ import annotations

import struct
from typing import AsyncIterator

import pytest

from conftest import API_KEY, SANDBOX_ID, sandbox_record
from fake_appliance import FakeAppliance, ServerSocket
from opencomputer import ExecOutput, ExecSessionInfo, OpenComputerError, ProcessResult, Sandbox
from opencomputer.websocket import OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, accept_key, mask

EXEC = f"/api/sandboxes/{SANDBOX_ID}/exec"


@pytest.fixture
async def sandbox(fake: FakeAppliance) -> AsyncIterator[Sandbox]:
    fake.reply("GET", f"/api/sandboxes/{SANDBOX_ID}", 200, sandbox_record())
    sb = await Sandbox.connect(SANDBOX_ID)
    fake.requests.clear()
    yield sb
    await sb.close()


def test_accept_key_matches_rfc6455_example() -> None:
    # The worked example of RFC 6455 section 1.3.
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_mask_is_its_own_inverse() -> None:
    key = b"\x01\x02\x03\x04"
    assert mask(b"abcde", key) == bytes([0x60, 0x60, 0x60, 0x60, 0x64])
    assert mask(mask(b"payload", key), key) == b"payload"
    assert mask(b"", key) == b""


async def test_start_sends_the_contract_body(fake: FakeAppliance, sandbox: Sandbox) -> None:
    fake.reply("POST", EXEC, 201, {"sessionID": "s1"})
    session = await sandbox.exec.start("python3 app.py", args=["--port", "80"], env={"K": "v"}, cwd="/srv", timeout=30)
    assert session.session_id == "s1"
    request = fake.only()
    assert request.json == {"cmd": "python3 app.py", "args": ["--port", "80"], "envs": {"K": "v"}, "cwd": "/srv", "timeout": 30}
    assert request.headers["x-api-key"] == API_KEY
    fake.requests.clear()
    await sandbox.exec.start("sleep 100")
    assert fake.only().json == {"cmd": "sleep 100"}


async def test_list_and_kill(fake: FakeAppliance, sandbox: Sandbox) -> None:
    fake.reply("GET", EXEC, 200, [
        {"sessionID": "s1", "cmd": "sleep 100", "running": True, "exitCode": None},
        {"sessionID": "s2", "cmd": "true", "running": False, "exitCode": 0},
    ])
    fake.reply("POST", f"{EXEC}/s1/kill", 204)
    fake.reply("POST", EXEC, 201, {"sessionID": "s1"})
    assert await sandbox.exec.list() == [
        ExecSessionInfo("s1", "sleep 100", True, None),
        ExecSessionInfo("s2", "true", False, 0),
    ]
    await sandbox.exec.kill("s1", signal=15)
    assert fake.requests[-1].json == {"signal": 15}
    session = await sandbox.exec.start("sleep 100")
    await session.kill()
    assert (fake.requests[-1].path, fake.requests[-1].json) == (f"{EXEC}/s1/kill", {"signal": 9})


def _script(ws: ServerSocket) -> None:
    """Replays a session: a ping, fragmented stdout, stderr, echo of stdin, exit 3, close."""
    ws.send_frame(OP_PING, b"hb")
    ws.send_frame(OP_BINARY, b"\x01hel", fin=False)
    ws.send_frame(OP_CONTINUATION, b"lo")
    ws.send_frame(OP_BINARY, b"\x02oops")
    opcode, payload, _ = ws.read_frame()
    assert opcode == OP_PONG and payload == b"hb"
    opcode, payload, _ = ws.read_frame()
    assert opcode == OP_BINARY and payload[:1] == b"\x00"
    ws.send_frame(OP_BINARY, b"\x01" + payload[1:])
    ws.send_frame(OP_BINARY, b"\x03" + struct.pack(">i", 3))
    ws.send_frame(OP_CLOSE, struct.pack(">H", 1000) + b"exited")


async def test_attach_streams_output_and_stdin(fake: FakeAppliance, sandbox: Sandbox) -> None:
    fake.reply("POST", EXEC, 201, {"sessionID": "s1"})
    fake.websockets[f"{EXEC}/s1"] = _script
    session = await sandbox.exec.start("cat")
    chunks = []
    async with await session.attach() as stream:
        chunks.append(await stream.__anext__())
        chunks.append(await stream.__anext__())
        await stream.send_stdin("typed ✓\n")
        async for chunk in stream:
            chunks.append(chunk)
    assert chunks == [
        ExecOutput("stdout", b"hello"),
        ExecOutput("stderr", b"oops"),
        ExecOutput("stdout", "typed ✓\n".encode("utf-8")),
    ]
    assert stream.exit_code == 3
    upgrade = fake.requests[-1]
    assert (upgrade.method, upgrade.path) == ("GET", f"{EXEC}/s1")
    assert upgrade.headers["x-api-key"] == API_KEY
    assert upgrade.headers["upgrade"].lower() == "websocket"
    assert upgrade.headers["sec-websocket-version"] == "13"
    # Every client frame is masked, as RFC 6455 requires.
    assert fake.sockets[0].received and all(masked for _, _, masked in fake.sockets[0].received)


async def test_wait_collects_output_and_negative_exit_codes(fake: FakeAppliance, sandbox: Sandbox) -> None:
    def script(ws: ServerSocket) -> None:
        ws.send_frame(OP_BINARY, b"\x01line 1\n")
        ws.send_frame(OP_BINARY, b"\x02warn\n")
        ws.send_frame(OP_BINARY, b"\x01line 2\n")
        ws.send_frame(OP_BINARY, b"\x03" + struct.pack(">i", -9))
        ws.send_frame(OP_CLOSE, struct.pack(">H", 1000))

    fake.reply("POST", EXEC, 201, {"sessionID": "s2"})
    fake.websockets[f"{EXEC}/s2"] = script
    session = await sandbox.exec.start("job")
    assert await session.wait() == ProcessResult(exit_code=-9, stdout="line 1\nline 2\n", stderr="warn\n")


async def test_stream_that_ends_without_exit_is_reported(fake: FakeAppliance, sandbox: Sandbox) -> None:
    def script(ws: ServerSocket) -> None:
        ws.send_frame(OP_BINARY, b"\x01partial")
        ws.send_frame(OP_CLOSE, struct.pack(">H", 1011) + b"session output ended")

    fake.reply("POST", EXEC, 201, {"sessionID": "s3"})
    fake.websockets[f"{EXEC}/s3"] = script
    session = await sandbox.exec.start("job")
    with pytest.raises(OpenComputerError, match="ended before the process exited"):
        await session.wait()


async def test_refused_upgrade_raises_the_server_error(fake: FakeAppliance, sandbox: Sandbox) -> None:
    fake.reply("POST", EXEC, 201, {"sessionID": "s4"})
    fake.reply("GET", f"{EXEC}/s4", 409, {"error": "sandbox is stopped"})
    session = await sandbox.exec.start("job")
    with pytest.raises(OpenComputerError) as info:
        await session.attach()
    assert (info.value.status, info.value.message) == (409, "sandbox is stopped")
