"""Background command sessions (``sandbox.exec``): start, list, kill, and attach to a
session's output over the appliance's WebSocket stream.

Stream messages start with one byte naming their kind: 0x00 stdin (client to server),
0x01 stdout, 0x02 stderr, 0x03 exit (a signed 32-bit big-endian exit code), 0x04 the end of
the replay of output written before attaching (nothing to do here: it is skipped).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from opencomputer.client import API_KEY_HEADER, ApiClient, expect_dict, expect_list, path_segment
from opencomputer.commands import ProcessResult
from opencomputer.errors import OpenComputerError
from opencomputer.websocket import WebSocket, WebSocketClosed

KIND_STDIN = 0x00
KIND_STDOUT = 0x01
KIND_STDERR = 0x02
KIND_EXIT = 0x03

#: The signal ``kill`` sends when none is given (SIGKILL).
DEFAULT_KILL_SIGNAL = 9


@dataclass(frozen=True)
class ExecOutput:
    """A chunk of a session's output: ``stream`` is ``"stdout"`` or ``"stderr"``."""

    stream: str
    data: bytes


@dataclass(frozen=True)
class ExecSessionInfo:
    """A session as ``exec.list`` reports it; ``exit_code`` is ``None`` while it runs."""

    session_id: str
    command: str
    running: bool
    exit_code: Optional[int]

    @classmethod
    def from_json(cls, data: Any) -> "ExecSessionInfo":
        """Parses the appliance's ``{sessionID, command, running, exitCode}``."""
        obj = expect_dict(data, "exec session")
        session_id = obj.get("sessionID")
        if not isinstance(session_id, str):
            raise OpenComputerError(None, "unexpected answer for exec session: sessionID is not a string")
        code = obj.get("exitCode")
        return cls(
            session_id=session_id,
            command=str(obj.get("command", obj.get("cmd", ""))),
            running=bool(obj.get("running", False)),
            exit_code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        )


class ExecStream:
    """An attached session: iterate it for :class:`ExecOutput` until the process exits.

    After the iteration ends, :attr:`exit_code` holds the exit code, or ``None`` if the
    stream ended without one (the connection dropped or the sandbox stopped).
    """

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws
        self._ended = False
        self.exit_code: Optional[int] = None

    async def send_stdin(self, data: Union[str, bytes]) -> None:
        """Writes to the process's standard input (``str`` as UTF-8)."""
        payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        await self._ws.send(bytes([KIND_STDIN]) + payload)

    def __aiter__(self) -> "ExecStream":
        return self

    async def __anext__(self) -> ExecOutput:
        while not self._ended:
            try:
                message = await self._ws.recv()
            except WebSocketClosed:
                self._ended = True
                break
            if not message:
                continue
            kind, payload = message[0], message[1:]
            if kind == KIND_STDOUT:
                return ExecOutput("stdout", payload)
            if kind == KIND_STDERR:
                return ExecOutput("stderr", payload)
            if kind == KIND_EXIT:
                if len(payload) < 4:
                    raise OpenComputerError(None, "exec stream: exit message shorter than 4 bytes")
                (self.exit_code,) = struct.unpack(">i", payload[:4])
                self._ended = True
                await self._ws.close()
            # Other kinds are not defined for server-to-client messages; skip them.
        raise StopAsyncIteration

    async def close(self) -> None:
        """Detaches; the process keeps running."""
        self._ended = True
        await self._ws.close()

    async def __aenter__(self) -> "ExecStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ExecSession:
    """A started background command. It runs until it exits or is killed, attached or not."""

    def __init__(self, client: ApiClient, sandbox_id: str, session_id: str) -> None:
        self._client = client
        self.sandbox_id = sandbox_id
        self.session_id = session_id

    def __repr__(self) -> str:
        return f"ExecSession(sandbox_id={self.sandbox_id!r}, session_id={self.session_id!r})"

    async def attach(self) -> ExecStream:
        """Opens the output stream. Output written before attaching is replayed first
        (the appliance keeps the last 1 MiB)."""
        api_url = self._client.config.api_url
        ws_url = "ws" + api_url[len("http"):] if api_url.startswith("http") else api_url
        url = f"{ws_url}/sandboxes/{path_segment(self.sandbox_id)}/exec/{path_segment(self.session_id)}"
        key = self._client.config.api_key
        ws = await WebSocket.connect(url, headers={API_KEY_HEADER: key} if key else {})
        return ExecStream(ws)

    async def wait(self) -> ProcessResult:
        """Attaches, collects all output until the process exits and returns it."""
        stdout, stderr = bytearray(), bytearray()
        async with await self.attach() as stream:
            async for chunk in stream:
                (stdout if chunk.stream == "stdout" else stderr).extend(chunk.data)
        if stream.exit_code is None:
            raise OpenComputerError(None, f"exec session {self.session_id}: the stream ended before the process exited")
        return ProcessResult(
            exit_code=stream.exit_code,
            stdout=stdout.decode("utf-8", "replace"),
            stderr=stderr.decode("utf-8", "replace"),
        )

    async def kill(self, signal: int = DEFAULT_KILL_SIGNAL) -> None:
        """Sends ``signal`` to the session's process group."""
        await _kill(self._client, self.sandbox_id, self.session_id, signal)


async def _kill(client: ApiClient, sandbox_id: str, session_id: str, signal: int) -> None:
    await client.request(
        "POST",
        f"/sandboxes/{path_segment(sandbox_id)}/exec/{path_segment(session_id)}/kill",
        json={"signal": signal},
    )


class Exec:
    """Starts, lists and kills background sessions in one sandbox."""

    def __init__(self, client: ApiClient, sandbox_id: str) -> None:
        self._client = client
        self._sandbox_id = sandbox_id

    async def start(
        self,
        cmd: str,
        args: Optional[List[str]] = None,
        env: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        timeout: Optional[int] = None,
    ) -> ExecSession:
        """Starts ``cmd`` (a shell line; ``args`` are appended, each quoted) in the background.

        Without ``timeout`` (seconds) the session runs until it exits, is killed, or the
        sandbox stops. Use :meth:`ExecSession.attach` or :meth:`ExecSession.wait` for its output.
        """
        body: Dict[str, Any] = {"cmd": cmd}
        if args:
            body["args"] = list(args)
        if env:
            body["envs"] = dict(env)
        if cwd:
            body["cwd"] = cwd
        if timeout:
            body["timeout"] = timeout
        data = expect_dict(
            await self._client.json("POST", f"/sandboxes/{path_segment(self._sandbox_id)}/exec", json=body),
            "exec start",
        )
        session_id = data.get("sessionID")
        if not isinstance(session_id, str) or not session_id:
            raise OpenComputerError(None, "unexpected answer for exec start: no sessionID")
        return ExecSession(self._client, self._sandbox_id, session_id)

    async def list(self) -> List[ExecSessionInfo]:
        """Returns the sandbox's running and recently ended sessions."""
        data = await self._client.json("GET", f"/sandboxes/{path_segment(self._sandbox_id)}/exec")
        return [ExecSessionInfo.from_json(s) for s in expect_list(data, "exec list")]

    async def kill(self, session_id: str, signal: int = DEFAULT_KILL_SIGNAL) -> None:
        """Sends ``signal`` (SIGKILL by default) to a session's process group."""
        await _kill(self._client, self._sandbox_id, session_id, signal)
