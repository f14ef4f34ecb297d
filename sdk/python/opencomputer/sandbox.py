"""Sandboxes: create or connect, then run commands, move files and manage sessions in
the microVM; ``async with`` kills the sandbox at the end of the block."""

from __future__ import annotations

from typing import Any, Dict, Optional

from opencomputer.client import ApiClient, ClientConfig, expect_dict, path_segment
from opencomputer.commands import Commands
from opencomputer.errors import OpenComputerError
from opencomputer.exec import Exec
from opencomputer.files import Files
from opencomputer.template import TEMPLATE_TIMEOUT

#: The documented defaults of ``Sandbox.create``; they equal the appliance's own defaults.
DEFAULT_TEMPLATE = "base"
DEFAULT_TIMEOUT = 300

#: Seconds a create call may take: the appliance answers once the microVM has booted,
#: which under nested virtualization (the CI test bed) can take minutes.
CREATE_TIMEOUT = 300.0


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class Sandbox:
    """One sandbox on the appliance.

    Attributes mirror the appliance's sandbox record as of the last call that returned it:
    ``sandbox_id``, ``template_id``, ``status`` (``running``, ``hibernated``, ``stopped`` or ``error``),
    ``started_at`` / ``end_at`` (RFC 3339), ``cpu_count``, ``memory_mb``, ``disk_mb``, ``metadata``.
    """

    def __init__(self, client: ApiClient, record: Dict[str, Any]) -> None:
        sandbox_id = record.get("sandboxID")
        if not isinstance(sandbox_id, str) or not sandbox_id:
            raise OpenComputerError(None, "unexpected sandbox record: no sandboxID")
        self._client = client
        self.sandbox_id: str = sandbox_id
        self._apply(record)
        self.commands = Commands(client, sandbox_id)
        self.files = Files(client, sandbox_id)
        self.exec = Exec(client, sandbox_id)

    def _apply(self, record: Dict[str, Any]) -> None:
        self.template_id: str = str(record.get("templateID", ""))
        self.status: str = str(record.get("status", ""))
        self.started_at: str = str(record.get("startedAt", ""))
        self.end_at: str = str(record.get("endAt", ""))
        self.cpu_count: int = _int(record.get("cpuCount"))
        self.memory_mb: int = _int(record.get("memoryMB"))
        self.disk_mb: int = _int(record.get("diskMB"))
        metadata = record.get("metadata")
        self.metadata: Dict[str, str] = dict(metadata) if isinstance(metadata, dict) else {}

    def __repr__(self) -> str:
        return f"Sandbox(sandbox_id={self.sandbox_id!r}, status={self.status!r}, template_id={self.template_id!r})"

    @property
    def id(self) -> str:
        """Same as :attr:`sandbox_id`."""
        return self.sandbox_id

    @classmethod
    async def create(
        cls,
        project: Optional[str] = None,
        template: str = DEFAULT_TEMPLATE,
        timeout: int = DEFAULT_TIMEOUT,
        envs: Optional[Dict[str, str]] = None,
        metadata: Optional[Dict[str, str]] = None,
        cpu_count: Optional[int] = None,
        memory_mb: Optional[int] = None,
        disk_mb: Optional[int] = None,
        *,
        api_url: Optional[str] = None,
        api_key: Optional[str] = None,
    ) -> "Sandbox":
        """Boots a new sandbox and returns it once it runs.

        ``project`` names a project whose defaults and secrets the sandbox gets (each secret
        appears as an env var holding a sealed ``osb_sealed_...`` token). ``timeout`` is the
        sandbox's lifetime in seconds; ``envs`` override same-named project secrets.

        With a project, ``template`` and ``timeout`` left at their defaults (``'base'``, 300)
        are not sent, so the project's own template and timeout apply; any other value
        overrides them. ``cpu_count`` and ``memory_mb`` are sent only when given (else the
        project's value, else the appliance default: 1 vCPU, 512 MB). ``disk_mb`` sizes the root
        disk (default: the template's, 2048 MB; at most 262144).
        """
        body: Dict[str, Any] = {}
        if project:
            body["project"] = project
        if template and (project is None or template != DEFAULT_TEMPLATE):
            body["templateID"] = template
        if timeout and (project is None or timeout != DEFAULT_TIMEOUT):
            body["timeout"] = timeout
        if envs:
            body["envs"] = dict(envs)
        if metadata:
            body["metadata"] = dict(metadata)
        if cpu_count:
            body["cpuCount"] = cpu_count
        if memory_mb:
            body["memoryMB"] = memory_mb
        if disk_mb:
            body["diskMB"] = disk_mb
        client = ApiClient(ClientConfig.resolve(api_url, api_key))
        try:
            record = expect_dict(
                await client.json("POST", "/sandboxes", json=body, timeout=CREATE_TIMEOUT), "sandbox create"
            )
            return cls(client, record)
        except BaseException:
            await client.aclose()
            raise

    @classmethod
    async def connect(
        cls, sandbox_id: str, *, api_url: Optional[str] = None, api_key: Optional[str] = None
    ) -> "Sandbox":
        """Returns a handle to an existing sandbox (404 if there is none)."""
        client = ApiClient(ClientConfig.resolve(api_url, api_key))
        try:
            record = expect_dict(
                await client.json("GET", f"/sandboxes/{path_segment(sandbox_id)}"), "sandbox get"
            )
            return cls(client, record)
        except BaseException:
            await client.aclose()
            raise

    async def refresh(self) -> None:
        """Reloads the sandbox record (status, ``end_at``, ...) from the appliance."""
        record = expect_dict(
            await self._client.json("GET", f"/sandboxes/{path_segment(self.sandbox_id)}"), "sandbox get"
        )
        self._apply(record)

    async def is_running(self) -> bool:
        """Whether the sandbox is running now; ``False`` once it is stopped or gone (404)."""
        try:
            await self.refresh()
        except OpenComputerError as e:
            if e.status == 404:
                self.status = "stopped"
                return False
            raise
        return self.status == "running"

    async def set_timeout(self, timeout: int) -> None:
        """Sets the sandbox's idle timeout: it hibernates (or, if its project says so, stops)
        ``timeout`` seconds after its last command, file or session call, counting from now (0: no
        automatic end)."""
        await self._client.request(
            "POST", f"/sandboxes/{path_segment(self.sandbox_id)}/timeout", json={"timeout": timeout}
        )

    async def save_as_template(self, name: str, *, timeout: float = TEMPLATE_TIMEOUT) -> Dict[str, Any]:
        """Saves the sandbox's root disk as it is now as a new template named ``name`` and
        returns the template dict (``"source": "sandbox"``); new sandboxes can then be created
        from it. Its running processes are not part of it, and it keeps the defaults of the
        sandbox's own template. The sandbox must be running or hibernated (else 409); a name
        already taken is 409 too. It answers once the template is ready, which can take minutes:
        ``timeout`` is how long the call waits."""
        return expect_dict(
            await self._client.json(
                "POST", f"/sandboxes/{path_segment(self.sandbox_id)}/template", json={"name": name}, timeout=timeout
            ),
            "template save",
        )

    async def kill(self) -> None:
        """Stops the sandbox and deletes it."""
        await self._client.request("DELETE", f"/sandboxes/{path_segment(self.sandbox_id)}")
        self.status = "stopped"

    async def close(self) -> None:
        """Closes the connection pool; the sandbox keeps running."""
        await self._client.aclose()

    async def __aenter__(self) -> "Sandbox":
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Kills the sandbox (already gone is fine) and closes the connection pool."""
        try:
            await self.kill()
        except OpenComputerError as e:
            if e.status != 404:
                raise
        finally:
            await self.close()
