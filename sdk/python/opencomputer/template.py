"""Templates: the root filesystems sandboxes start from. Besides the ones its image ships, the
appliance makes templates from an uploaded archive (an image archive from ``docker save`` or an
OCI layout, or a root filesystem tarball) or from a sandbox's disk
(:meth:`opencomputer.Sandbox.save_as_template`). It builds no Dockerfiles: build the image
elsewhere, save it, and upload the archive.

Every method is a static coroutine that opens a connection for the call and closes it again;
templates are plain dicts exactly as the appliance returns them:
``{templateID, name, tag, status, builtIn, source, sourceDigest, sizeBytes, diskMB, createdAt?,
defaults?: {env, workingDir, user, entrypoint, cmd}}`` (``createdAt`` and ``defaults`` only for
templates made on the appliance).
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any, AsyncIterator, BinaryIO, Dict, List, Optional, Union

from opencomputer.client import ApiClient, ClientConfig, expect_dict, expect_list, path_segment
from opencomputer.errors import OpenComputerError

#: Content-Type of an image archive (OCI image layout or ``docker save``; the appliance tells
#: them apart by their content).
IMAGE_ARCHIVE_TYPE = "application/x-tar"
#: Content-Type of a root filesystem tarball (plain, gzip or zstd).
ROOTFS_TARBALL_TYPE = "application/vnd.opencomputer.rootfs+tar"

#: Seconds a template import or save may wait on the appliance: it answers once the template is
#: ready (archive received and unpacked, disk made, booted once), and one template change at a
#: time is made, so a call may also wait for another one to finish.
TEMPLATE_TIMEOUT = 1800.0
#: Bytes read from disk and sent at a time when uploading a file.
UPLOAD_CHUNK = 1 << 20

ArchiveSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]


def _client(api_url: Optional[str], api_key: Optional[str]) -> ApiClient:
    return ApiClient(ClientConfig.resolve(api_url, api_key))


async def _file_chunks(file: BinaryIO, size: int, shown: str) -> AsyncIterator[bytes]:
    """Yields exactly ``size`` bytes of ``file`` (read off the event loop), one chunk at a time.

    A file that shrinks or grows while it is sent raises before its last byte leaves, so the
    appliance never takes a truncated or mixed archive for a whole one.
    """
    remaining = size
    while remaining > 0:
        chunk = await asyncio.to_thread(file.read, min(UPLOAD_CHUNK, remaining))
        if not chunk:
            raise OpenComputerError(
                None, f"{shown} became shorter while it was uploaded ({size - remaining} of {size} bytes sent)"
            )
        remaining -= len(chunk)
        if remaining == 0 and await asyncio.to_thread(file.read, 1):
            raise OpenComputerError(None, f"{shown} grew while it was uploaded (it had {size} bytes)")
        yield chunk


class Template:
    """Static methods to list, import and delete templates."""

    @staticmethod
    async def list(*, api_url: Optional[str] = None, api_key: Optional[str] = None) -> List[Dict[str, Any]]:
        """Returns every template: the shipped ones (``"builtIn": True``) and those made on the appliance."""
        async with _client(api_url, api_key) as client:
            return expect_list(await client.json("GET", "/templates"), "template list")

    @staticmethod
    async def get(name: str, *, api_url: Optional[str] = None, api_key: Optional[str] = None) -> Dict[str, Any]:
        """Returns the template with this name (404 if there is none)."""
        async with _client(api_url, api_key) as client:
            return expect_dict(await client.json("GET", f"/templates/{path_segment(name)}"), "template get")

    @staticmethod
    async def import_archive(
        source: ArchiveSource,
        name: str,
        *,
        tag: str = "",
        rootfs: bool = False,
        timeout: float = TEMPLATE_TIMEOUT,
        api_url: Optional[str] = None,
        api_key: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Uploads an archive and returns the new template once it is ready.

        ``source`` is a file path (``str`` or ``pathlib.Path``), streamed from disk with its
        size as ``Content-Length``, or the archive's bytes. By default it is an image archive
        (``docker save``, ``skopeo copy ... oci-archive:``, ``podman save``; sent as
        ``application/x-tar``) whose environment, working directory, user, entrypoint and cmd
        become the template's ``defaults``; with ``rootfs=True`` it is a root filesystem tarball
        (plain, gzip or zstd; sent as ``application/vnd.opencomputer.rootfs+tar``). ``tag`` is
        recorded with the template (the appliance's default: ``latest``).

        This can take minutes: ``timeout`` is how long the call waits on the appliance.
        Raises :class:`OpenComputerError`: 400 a bad name or a refused archive, 409 the name is
        taken, 413 too large for the appliance's free space, 503 no sandbox runtime; status
        ``None`` when ``source`` cannot be read.
        """
        params = {"name": name}
        if tag:
            params["tag"] = tag
        headers = {"Content-Type": ROOTFS_TARBALL_TYPE if rootfs else IMAGE_ARCHIVE_TYPE}
        if isinstance(source, (bytes, bytearray, memoryview)):
            async with _client(api_url, api_key) as client:
                response = await client.json(
                    "POST", "/templates", params=params, content=bytes(source), headers=headers, timeout=timeout
                )
            return expect_dict(response, "template import")
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"source must be a path or bytes, not {type(source).__name__}")
        path = Path(source)
        not_regular = OpenComputerError(None, f"cannot upload {path}: not a regular file (give its bytes instead)")
        try:
            # Checked before opening too: opening a FIFO would wait for a writer.
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise not_regular
            file = open(path, "rb")
        except OSError as e:
            raise OpenComputerError(None, f"cannot read {path}: {e.strerror or e}") from e
        try:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise not_regular
            size = info.st_size
            headers["Content-Length"] = str(size)
            async with _client(api_url, api_key) as client:
                response = await client.json(
                    "POST",
                    "/templates",
                    params=params,
                    content=_file_chunks(file, size, str(path)),
                    headers=headers,
                    timeout=timeout,
                )
        finally:
            file.close()
        return expect_dict(response, "template import")

    @staticmethod
    async def delete(name: str, *, api_url: Optional[str] = None, api_key: Optional[str] = None) -> None:
        """Deletes a template made on the appliance (403 for a shipped one, 409 while a sandbox
        that is not stopped uses it)."""
        async with _client(api_url, api_key) as client:
            await client.request("DELETE", f"/templates/{path_segment(name)}")
