"""A minimal RFC 6455 WebSocket client on asyncio streams, as much as exec sessions need:
the opening handshake with extra headers, masked frames out, binary messages in
(fragmented or not), ping/pong and the closing handshake. No extensions, no subprotocols."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import ssl
import struct
from typing import Dict, Optional, Tuple

import httpx

from opencomputer.errors import OpenComputerError

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Largest message accepted from the server (exec output arrives in small chunks).
MAX_MESSAGE = 16 * 1024 * 1024
#: Largest handshake answer (status line, headers and an error body).
MAX_HANDSHAKE = 64 * 1024
#: Seconds allowed for connecting and the opening handshake.
HANDSHAKE_TIMEOUT = 30.0

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def accept_key(client_key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value a server must answer for ``client_key``."""
    digest = hashlib.sha1((client_key + _GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def mask(payload: bytes, key: bytes) -> bytes:
    """XORs ``payload`` with the repeating 4-byte ``key`` (the same operation unmasks)."""
    if not payload:
        return b""
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    n = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    return n.to_bytes(len(payload), "big")


def encode_frame(opcode: int, payload: bytes, key: Optional[bytes] = None) -> bytes:
    """One final client frame; ``key`` is the masking key (random when not given)."""
    key = key if key is not None else os.urandom(4)
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + key + mask(payload, key)


class WebSocketClosed(Exception):
    """The connection ended; ``code`` is the close code the server sent, if any."""

    def __init__(self, code: Optional[int], reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"WebSocket closed ({code}): {reason}" if code is not None else f"WebSocket closed: {reason}")


def _protocol_error(why: str) -> OpenComputerError:
    return OpenComputerError(None, f"WebSocket protocol error: {why}")


async def _read_head(reader: asyncio.StreamReader) -> Tuple[int, Dict[str, str]]:
    """Reads the handshake's status line and headers (names lower-cased)."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        raise OpenComputerError(None, "the appliance closed the connection during the WebSocket handshake") from e
    except asyncio.LimitOverrunError as e:
        raise _protocol_error("handshake answer too large") from e
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise _protocol_error(f"bad status line {lines[0][:100]!r}")
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _refusal(reader: asyncio.StreamReader, status: int, headers: Dict[str, str]) -> OpenComputerError:
    """Turns a non-101 handshake answer into the same error an ordinary call would raise."""
    message = f"HTTP {status}"
    length = headers.get("content-length", "")
    if length.isdigit() and 0 < int(length) <= MAX_HANDSHAKE:
        try:
            body = await reader.readexactly(int(length))
            parsed = json.loads(body.decode("utf-8"))
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
                message = parsed["error"]
        except (asyncio.IncompleteReadError, ValueError):
            pass
    return OpenComputerError(status, message)


class WebSocket:
    """One open client connection. Use :meth:`connect`, then :meth:`recv` / :meth:`send` / :meth:`close`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._closed = False

    @classmethod
    async def connect(cls, url: str, headers: Optional[Dict[str, str]] = None) -> "WebSocket":
        """Opens ``ws://`` / ``wss://`` ``url`` (``http(s)://`` is accepted too) with extra request headers."""
        parsed = httpx.URL(url)
        secure = parsed.scheme in ("wss", "https")
        if parsed.scheme not in ("ws", "wss", "http", "https") or not parsed.host:
            raise OpenComputerError(None, f"invalid WebSocket URL {url!r}")
        port = parsed.port or (443 if secure else 80)
        target = parsed.raw_path.decode("ascii") or "/"
        host_header = parsed.host if parsed.port is None else f"{parsed.host}:{port}"
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {host_header}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

        async def handshake() -> "WebSocket":
            context = ssl.create_default_context() if secure else None
            reader, writer = await asyncio.open_connection(
                parsed.host, port, ssl=context, limit=MAX_HANDSHAKE
            )
            try:
                writer.write(request)
                await writer.drain()
                status, answer = await _read_head(reader)
                if status != 101:
                    raise await _refusal(reader, status, answer)
                if answer.get("upgrade", "").lower() != "websocket" or answer.get("sec-websocket-accept") != accept_key(key):
                    raise _protocol_error("the server did not accept the upgrade properly")
            except BaseException:
                writer.close()
                raise
            return cls(reader, writer)

        try:
            return await asyncio.wait_for(handshake(), HANDSHAKE_TIMEOUT)
        except asyncio.TimeoutError as e:
            raise OpenComputerError(None, f"WebSocket handshake with {parsed.host}:{port} timed out") from e
        except OSError as e:
            raise OpenComputerError(None, f"cannot reach {parsed.host}:{port}: {e}") from e

    async def _read_frame(self) -> Tuple[bool, int, bytes]:
        try:
            b0, b1 = await self._reader.readexactly(2)
            if b0 & 0x70:
                raise _protocol_error("reserved bits set")
            if b1 & 0x80:
                raise _protocol_error("server frames must not be masked")
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack(">H", await self._reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack(">Q", await self._reader.readexactly(8))
            if n > MAX_MESSAGE:
                raise _protocol_error(f"frame of {n} bytes exceeds {MAX_MESSAGE}")
            payload = await self._reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            self._closed = True
            raise WebSocketClosed(None, "connection lost") from e
        return bool(b0 & 0x80), b0 & 0x0F, payload

    async def recv(self) -> bytes:
        """Returns the next data message; answers pings on the way.

        Raises :class:`WebSocketClosed` once the server closes (after answering its close)."""
        if self._closed:
            raise WebSocketClosed(None, "already closed")
        message = b""
        in_message = False
        while True:
            fin, opcode, payload = await self._read_frame()
            if opcode == OP_PING:
                await self._send_frame(OP_PONG, payload)
            elif opcode == OP_PONG:
                continue
            elif opcode == OP_CLOSE:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                reason = payload[2:].decode("utf-8", "replace")
                await self._finish_close(code if code is not None else 1000)
                raise WebSocketClosed(code, reason)
            elif opcode in (OP_BINARY, OP_TEXT) and not in_message:
                message, in_message = payload, True
            elif opcode == OP_CONTINUATION and in_message:
                message += payload
            else:
                raise _protocol_error(f"unexpected frame opcode {opcode}")
            if in_message and len(message) > MAX_MESSAGE:
                raise _protocol_error(f"message exceeds {MAX_MESSAGE} bytes")
            if in_message and fin:
                return message

    async def send(self, payload: bytes) -> None:
        """Sends one binary message."""
        if self._closed:
            raise WebSocketClosed(None, "already closed")
        await self._send_frame(OP_BINARY, payload)

    async def _send_frame(self, opcode: int, payload: bytes) -> None:
        try:
            self._writer.write(encode_frame(opcode, payload))
            await self._writer.drain()
        except ConnectionError as e:
            self._closed = True
            raise WebSocketClosed(None, "connection lost") from e

    async def _finish_close(self, code: int) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._writer.write(encode_frame(OP_CLOSE, struct.pack(">H", code)))
                await self._writer.drain()
            except ConnectionError:
                pass
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass

    async def close(self) -> None:
        """Sends a normal close and drops the connection (without waiting for the server's answer)."""
        await self._finish_close(1000)
