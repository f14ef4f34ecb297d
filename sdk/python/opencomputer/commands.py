"""One-shot shell commands in a sandbox (``sandbox.commands.run``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from opencomputer.client import COMMAND_TIMEOUT_MARGIN, ApiClient, expect_dict, path_segment
from opencomputer.errors import OpenComputerError

#: Seconds a command may run when ``run`` is given no timeout.
DEFAULT_COMMAND_TIMEOUT = 60


@dataclass(frozen=True)
class ProcessResult:
    """How a command ended: its exit code and everything it wrote (decoded as UTF-8)."""

    exit_code: int
    stdout: str
    stderr: str

    @classmethod
    def from_json(cls, data: Any) -> "ProcessResult":
        """Parses the appliance's ``{exitCode, stdout, stderr}``."""
        obj = expect_dict(data, "command result")
        code = obj.get("exitCode")
        if not isinstance(code, int) or isinstance(code, bool):
            raise OpenComputerError(None, "unexpected answer for command result: exitCode is not an integer")
        return cls(exit_code=code, stdout=str(obj.get("stdout") or ""), stderr=str(obj.get("stderr") or ""))


class Commands:
    """Runs shell command lines in one sandbox."""

    def __init__(self, client: ApiClient, sandbox_id: str) -> None:
        self._client = client
        self._sandbox_id = sandbox_id

    async def run(
        self,
        cmd: str,
        timeout: int = DEFAULT_COMMAND_TIMEOUT,
        env: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
    ) -> ProcessResult:
        """Runs ``cmd`` with ``sh -c`` and waits for it.

        ``timeout`` is in seconds; at the limit the appliance kills the command's whole
        process group. ``env`` adds variables for this command only; ``cwd`` is its working
        directory. A non-zero exit code is returned, not raised.
        """
        body: Dict[str, Any] = {"cmd": cmd, "timeout": timeout}
        if env:
            body["envs"] = dict(env)
        if cwd:
            body["cwd"] = cwd
        data = await self._client.json(
            "POST",
            f"/sandboxes/{path_segment(self._sandbox_id)}/commands",
            json=body,
            # The appliance treats 0 as its 60 s default.
            timeout=(timeout if timeout > 0 else DEFAULT_COMMAND_TIMEOUT) + COMMAND_TIMEOUT_MARGIN,
        )
        return ProcessResult.from_json(data)
