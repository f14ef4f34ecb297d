"""Files inside a sandbox (``sandbox.files``). Content travels as the raw HTTP body;
the path is the ``?path=`` query parameter (absolute, or relative to the sandbox user's home)."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any, List, Union

from opencomputer.client import ApiClient, expect_dict, expect_list, path_segment
from opencomputer.errors import OpenComputerError

#: Seconds a file transfer may take (files can be much larger than API answers).
FILE_TRANSFER_TIMEOUT = 300.0


@dataclass(frozen=True)
class EntryInfo:
    """One directory entry: ``size`` is 0 for directories."""

    name: str
    is_dir: bool
    path: str
    size: int

    @classmethod
    def from_json(cls, data: Any) -> "EntryInfo":
        """Parses the appliance's ``{name, isDir, path, size}``."""
        obj = expect_dict(data, "directory entry")
        name = obj.get("name")
        if not isinstance(name, str):
            raise OpenComputerError(None, "unexpected answer for directory entry: name is not a string")
        size = obj.get("size", 0)
        return cls(
            name=name,
            is_dir=bool(obj.get("isDir", False)),
            path=str(obj.get("path", "")),
            size=size if isinstance(size, int) else 0,
        )


def _parent_and_name(path: str) -> "tuple[str, str]":
    """Splits a path into (directory to list, entry name); relative names live in ``.``."""
    trimmed = path.rstrip("/") or "/"
    parent, name = posixpath.split(trimmed)
    return (parent or "."), name


class Files:
    """Reads, writes and lists files in one sandbox."""

    def __init__(self, client: ApiClient, sandbox_id: str) -> None:
        self._client = client
        self._base = f"/sandboxes/{path_segment(sandbox_id)}/files"

    async def read(self, path: str) -> str:
        """Returns a text file's content (UTF-8; use :meth:`read_bytes` for binary files)."""
        data = await self.read_bytes(path)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise OpenComputerError(None, f"{path} is not UTF-8 text; use files.read_bytes()") from e

    async def read_bytes(self, path: str) -> bytes:
        """Returns a file's content as bytes."""
        response = await self._client.request("GET", self._base, params={"path": path}, timeout=FILE_TRANSFER_TIMEOUT)
        return response.content

    async def write(self, path: str, content: Union[str, bytes]) -> None:
        """Creates or replaces a file (the appliance replaces it atomically). ``str`` is written as UTF-8."""
        data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
        await self._client.request(
            "PUT",
            self._base,
            params={"path": path},
            content=data,
            headers={"Content-Type": "application/octet-stream"},
            timeout=FILE_TRANSFER_TIMEOUT,
        )

    async def list(self, path: str = "/") -> List[EntryInfo]:
        """Returns the entries of a directory, sorted by name."""
        data = await self._client.json("GET", f"{self._base}/list", params={"path": path})
        return [EntryInfo.from_json(e) for e in expect_list(data, "directory list")]

    async def make_dir(self, path: str) -> None:
        """Creates a directory and any missing parents (like ``mkdir -p``)."""
        await self._client.request("POST", f"{self._base}/mkdir", params={"path": path})

    async def remove(self, path: str) -> None:
        """Removes a file or directory (a symlink itself, never its target)."""
        await self._client.request("DELETE", self._base, params={"path": path})

    async def exists(self, path: str) -> bool:
        """Whether a file or directory exists at ``path``.

        Looks the name up in its parent directory, so it works for directories too and
        never downloads the file. A missing parent means ``False``; any other failure
        (sandbox stopped, bad path, ...) raises.
        """
        parent, name = _parent_and_name(path)
        try:
            entries = await self.list(parent)
        except OpenComputerError as e:
            if e.status == 404:
                return False
            raise
        if not name:
            # The root directory: listing it succeeded.
            return True
        return any(entry.name == name for entry in entries)
