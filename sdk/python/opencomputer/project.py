"""Projects: named sandbox defaults (template, resources, timeout, egress allowlist) and their secrets.

Every method is a static coroutine that opens a connection for the call and closes it
again; projects are plain dicts exactly as the appliance returns them:
``{id, name, template, cpuCount, memoryMB, timeoutSec, egressAllowlist, createdAt, updatedAt}``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from opencomputer.client import ApiClient, ClientConfig, expect_dict, expect_list, path_segment


def _changed_fields(
    name: str,
    template: str,
    cpu_count: int,
    memory_mb: int,
    timeout_sec: int,
    egress_allowlist: Optional[List[str]],
) -> Dict[str, Any]:
    """The request body: only the fields that were given (empty or zero means "not given")."""
    body: Dict[str, Any] = {}
    if name:
        body["name"] = name
    if template:
        body["template"] = template
    if cpu_count:
        body["cpuCount"] = cpu_count
    if memory_mb:
        body["memoryMB"] = memory_mb
    if timeout_sec:
        body["timeoutSec"] = timeout_sec
    if egress_allowlist:
        body["egressAllowlist"] = list(egress_allowlist)
    return body


def _client(api_url: Optional[str], api_key: Optional[str]) -> ApiClient:
    return ApiClient(ClientConfig.resolve(api_url, api_key))


class Project:
    """Static methods for projects and their encrypted secrets."""

    @staticmethod
    async def create(
        name: str,
        template: str = "",
        cpu_count: int = 0,
        memory_mb: int = 0,
        timeout_sec: int = 0,
        egress_allowlist: Optional[List[str]] = None,
        *,
        api_url: Optional[str] = None,
        api_key: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Creates a project and returns it.

        Fields left empty or zero take the appliance defaults (template ``base``, 1 vCPU,
        512 MB, 300 s). ``egress_allowlist`` lists the hosts (``api.example.com`` or
        ``*.example.com``) the project's sandboxes and secrets may reach; none by default.
        Raises :class:`OpenComputerError` (409 when the name is taken, 400 on invalid input).
        """
        body = _changed_fields(name, template, cpu_count, memory_mb, timeout_sec, egress_allowlist)
        body["name"] = name
        async with _client(api_url, api_key) as client:
            return expect_dict(await client.json("POST", "/projects", json=body), "project create")

    @staticmethod
    async def list(*, api_url: Optional[str] = None, api_key: Optional[str] = None) -> List[Dict[str, Any]]:
        """Returns all projects, oldest first."""
        async with _client(api_url, api_key) as client:
            return expect_list(await client.json("GET", "/projects"), "project list")

    @staticmethod
    async def get(id: str, *, api_url: Optional[str] = None, api_key: Optional[str] = None) -> Dict[str, Any]:
        """Returns the project with this id (404 if there is none)."""
        async with _client(api_url, api_key) as client:
            return expect_dict(await client.json("GET", f"/projects/{path_segment(id)}"), "project get")

    @staticmethod
    async def update(
        id: str,
        name: str = "",
        template: str = "",
        cpu_count: int = 0,
        memory_mb: int = 0,
        timeout_sec: int = 0,
        egress_allowlist: Optional[List[str]] = None,
        *,
        api_url: Optional[str] = None,
        api_key: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Changes only the fields that are given and returns the updated project.

        Empty strings, zeros, ``None`` and an empty allowlist are not sent, so they keep
        the project's current value.
        """
        body = _changed_fields(name, template, cpu_count, memory_mb, timeout_sec, egress_allowlist)
        async with _client(api_url, api_key) as client:
            return expect_dict(await client.json("PUT", f"/projects/{path_segment(id)}", json=body), "project update")

    @staticmethod
    async def delete(id: str, *, api_url: Optional[str] = None, api_key: Optional[str] = None) -> None:
        """Deletes the project and its secrets; sandboxes already running keep running."""
        async with _client(api_url, api_key) as client:
            await client.request("DELETE", f"/projects/{path_segment(id)}")

    @staticmethod
    async def set_secret(
        id: str,
        name: str,
        value: str,
        *,
        allowed_hosts: Optional[List[str]] = None,
        api_url: Optional[str] = None,
        api_key: Optional[str] = None,
    ) -> None:
        """Stores (or replaces) a secret. The appliance encrypts it and never returns it;
        sandboxes of the project see only a sealed ``osb_sealed_...`` token in ``$name``.

        ``allowed_hosts`` (``api.example.com``, ``*.example.com``, ``db.example.com:5432``)
        limits where the real value may be sent; without it the project's egress allowlist
        applies. Replacing a secret replaces its hosts too. Running sandboxes that hold a
        token for this secret use the new value and hosts as soon as this returns.
        """
        body: Dict[str, Any] = {"value": value}
        if allowed_hosts is not None:
            body["allowedHosts"] = list(allowed_hosts)
        async with _client(api_url, api_key) as client:
            await client.request("PUT", f"/projects/{path_segment(id)}/secrets/{path_segment(name)}", json=body)

    @staticmethod
    async def list_secrets(
        id: str, *, api_url: Optional[str] = None, api_key: Optional[str] = None
    ) -> List[Dict[str, Any]]:
        """Returns the project's secrets as ``{"name", "allowedHosts"}`` dicts sorted by name,
        never their values. ``allowedHosts`` is empty for a secret that follows the project's
        egress allowlist."""
        async with _client(api_url, api_key) as client:
            entries = expect_list(await client.json("GET", f"/projects/{path_segment(id)}/secrets"), "secret list")
        # Appliances before per-secret hosts answered with bare names.
        return [
            {"name": e, "allowedHosts": []} if isinstance(e, str) else expect_dict(e, "secret list entry")
            for e in entries
        ]

    @staticmethod
    async def delete_secret(
        id: str, name: str, *, api_url: Optional[str] = None, api_key: Optional[str] = None
    ) -> None:
        """Deletes one secret (404 if the project or the secret does not exist)."""
        async with _client(api_url, api_key) as client:
            await client.request("DELETE", f"/projects/{path_segment(id)}/secrets/{path_segment(name)}")
