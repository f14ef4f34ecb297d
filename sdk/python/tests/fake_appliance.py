"""Test double: a stdlib HTTP server in a thread that records every request and answers
what the test programmed, per the wire contract (including the exec WebSocket upgrade)."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


#: Bytes the fake reads from a request body at a time when it does not keep the body.
BODY_CHUNK = 64 << 10


@dataclass
class Recorded:
    method: str
    path: str
    query: Dict[str, List[str]]
    headers: Dict[str, str]
    #: The body, unless the fake was told not to keep bodies (``keep_bodies=False``).
    body: bytes
    #: How many body bytes arrived and their SHA-256 (kept even when the body is not).
    body_length: int = 0
    body_sha256: str = hashlib.sha256(b"").hexdigest()
    #: The connection ended before the body announced by Content-Length was complete.
    body_incomplete: bool = False

    @property
    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    #: Seconds to wait after reading the request before answering.
    delay: float = 0.0


class ServerSocket:
    """The server end of an upgraded connection: unmasked frames out, masked frames in."""

    def __init__(self, handler: BaseHTTPRequestHandler) -> None:
        self._rfile = handler.rfile
        self._wfile = handler.wfile
        self.received: List[Tuple[int, bytes, bool]] = []

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        head = bytes([(0x80 if fin else 0) | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([n])
        elif n < 1 << 16:
            head += bytes([126]) + struct.pack(">H", n)
        else:
            head += bytes([127]) + struct.pack(">Q", n)
        self._wfile.write(head + payload)
        self._wfile.flush()

    def read_frame(self) -> Tuple[int, bytes, bool]:
        """Returns (opcode, unmasked payload, whether the client masked it)."""
        b0, b1 = self._rfile.read(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack(">H", self._rfile.read(2))
        elif n == 127:
            (n,) = struct.unpack(">Q", self._rfile.read(8))
        masked = bool(b1 & 0x80)
        key = self._rfile.read(4) if masked else b"\0\0\0\0"
        data = self._rfile.read(n)
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(data))
        frame = (b0 & 0x0F, payload, masked)
        self.received.append(frame)
        return frame


WebSocketScript = Callable[[ServerSocket], None]


@dataclass
class FakeAppliance:
    replies: Dict[Tuple[str, str], Reply] = field(default_factory=dict)
    websockets: Dict[str, WebSocketScript] = field(default_factory=dict)
    requests: List[Recorded] = field(default_factory=list)
    sockets: List[ServerSocket] = field(default_factory=list)
    errors: List[BaseException] = field(default_factory=list)
    #: False: request bodies are read in chunks of BODY_CHUNK and only their length and hash
    #: are recorded, so a test can measure what the client alone holds in memory.
    keep_bodies: bool = True
    _server: Optional[ThreadingHTTPServer] = None

    def reply(self, method: str, path: str, status: int = 200, json_body: Any = None, raw: Optional[bytes] = None,
              content_type: str = "application/json", delay: float = 0.0) -> None:
        body = raw if raw is not None else (b"" if json_body is None else json.dumps(json_body).encode())
        self.replies[(method, path)] = Reply(status, body, content_type, delay)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/api"

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> None:
        """Waits until `count` requests are recorded: one whose client gave up mid-body is
        recorded by the server thread only once it sees the connection end."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def only(self) -> Recorded:
        assert len(self.requests) == 1, [f"{r.method} {r.path}" for r in self.requests]
        return self.requests[0]

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _read_body(self) -> Tuple[bytes, int, str, bool]:
                """(body or b"", length, sha256, incomplete), for Content-Length or chunked bodies."""
                digest = hashlib.sha256()
                kept: List[bytes] = []
                received = 0

                def take(n: int) -> bool:
                    nonlocal received
                    while n > 0:
                        data = self.rfile.read(min(n, BODY_CHUNK))
                        if not data:
                            return False
                        digest.update(data)
                        if fake.keep_bodies:
                            kept.append(data)
                        received += len(data)
                        n -= len(data)
                    return True

                complete = True
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    while True:
                        size_line = self.rfile.readline()
                        if not size_line:
                            complete = False
                            break
                        size = int(size_line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            break
                        if not take(size):
                            complete = False
                            break
                        self.rfile.readline()
                else:
                    complete = take(int(self.headers.get("Content-Length") or 0))
                return b"".join(kept), received, digest.hexdigest(), not complete

            def _handle(self) -> None:
                parts = urlsplit(self.path)
                body, length, sha256, incomplete = self._read_body()
                fake.requests.append(Recorded(
                    self.command, parts.path, parse_qs(parts.query, keep_blank_values=True),
                    {k.lower(): v for k, v in self.headers.items()}, body, length, sha256, incomplete,
                ))
                if incomplete:
                    self.close_connection = True
                    return
                script = fake.websockets.get(parts.path)
                if script is not None and self.headers.get("Upgrade", "").lower() == "websocket":
                    return self._upgrade(script)
                reply = fake.replies.get((self.command, parts.path))
                if reply is None:
                    reply = Reply(404, json.dumps({"error": f"fake: nothing programmed for {self.command} {parts.path}"}).encode())
                if reply.delay:
                    time.sleep(reply.delay)
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def _upgrade(self, script: WebSocketScript) -> None:
                digest = hashlib.sha1((self.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest()
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", base64.b64encode(digest).decode())
                self.end_headers()
                self.wfile.flush()
                ws = ServerSocket(self)
                fake.sockets.append(ws)
                try:
                    script(ws)
                except Exception as e:  # surfaced by the test through fake.errors
                    fake.errors.append(e)
                self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
