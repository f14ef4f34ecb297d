"""Template and Sandbox.save_as_template: the exact requests (method, path, query, content type,
body) and how uploads are streamed from disk."""

from __future__ import annotations

import hashlib
import io
import os
import tracemalloc
from pathlib import Path

import pytest

import opencomputer.template as template_module
from conftest import API_KEY, SANDBOX_ID, sandbox_record, template_record
from fake_appliance import FakeAppliance
from opencomputer import OpenComputerError, Sandbox, Template

ROOTFS_TYPE = "application/vnd.opencomputer.rootfs+tar"


def write_file(path: Path, size: int) -> str:
    """Writes `size` bytes of varied content in pieces (never the whole file in memory) and
    returns their SHA-256."""
    digest = hashlib.sha256()
    piece = bytes(range(256)) * 1024
    with open(path, "wb") as f:
        written = 0
        counter = 0
        while written < size:
            block = (counter.to_bytes(4, "big") + piece)[: size - written]
            f.write(block)
            digest.update(block)
            written += len(block)
            counter += 1
    return digest.hexdigest()


async def test_list_get_and_delete_use_the_template_paths(fake: FakeAppliance) -> None:
    built_in = template_record(templateID="base", name="base", builtIn=True, source="image", sizeBytes=1, diskMB=2048)
    del built_in["createdAt"], built_in["defaults"]
    fake.reply("GET", "/api/templates", 200, [built_in, template_record()])
    fake.reply("GET", "/api/templates/python", 200, template_record())
    fake.reply("DELETE", "/api/templates/python", 204)
    assert await Template.list() == [built_in, template_record()]
    assert await Template.get("python") == template_record()
    assert await Template.delete("python") is None
    assert [(r.method, r.path, r.query, r.body) for r in fake.requests] == [
        ("GET", "/api/templates", {}, b""),
        ("GET", "/api/templates/python", {}, b""),
        ("DELETE", "/api/templates/python", {}, b""),
    ]
    assert all(r.headers["x-api-key"] == API_KEY for r in fake.requests)


async def test_a_name_never_adds_a_path_segment(fake: FakeAppliance) -> None:
    fake.reply("GET", "/api/templates/a%2F..%2Fb", 404, {"error": 'template "a/../b" not found'})
    with pytest.raises(OpenComputerError) as info:
        await Template.get("a/../b")
    assert (info.value.status, info.value.message) == (404, 'template "a/../b" not found')
    assert fake.only().path == "/api/templates/a%2F..%2Fb"


async def test_import_of_bytes_sends_them_as_an_image_archive(fake: FakeAppliance) -> None:
    fake.reply("POST", "/api/templates", 201, template_record())
    archive = b"ustar-ish\0" * 1000
    assert await Template.import_archive(archive, "python") == template_record()
    request = fake.only()
    assert (request.method, request.path, request.query) == ("POST", "/api/templates", {"name": ["python"]})
    assert request.headers["content-type"] == "application/x-tar"
    assert request.headers["content-length"] == str(len(archive))
    assert "transfer-encoding" not in request.headers
    assert request.body == archive
    assert request.headers["x-api-key"] == API_KEY


async def test_import_with_a_tag_as_a_rootfs_tarball(fake: FakeAppliance) -> None:
    fake.reply("POST", "/api/templates", 201, template_record(tag="v1", source="rootfs-tarball"))
    created = await Template.import_archive(bytearray(b"\x28\xb5\x2f\xfd zstd"), "alpine", tag="v1", rootfs=True)
    assert created["tag"] == "v1"
    request = fake.only()
    assert request.query == {"name": ["alpine"], "tag": ["v1"]}
    assert request.headers["content-type"] == ROOTFS_TYPE
    assert request.body == b"\x28\xb5\x2f\xfd zstd"


@pytest.mark.parametrize("as_path", [str, Path], ids=["str", "Path"])
async def test_a_file_is_streamed_from_disk_with_its_length(
        fake: FakeAppliance, tmp_path: Path, as_path: type) -> None:
    size = 8 * 1024 * 1024 + 12345
    archive = tmp_path / "image.tar"
    sha256 = write_file(archive, size)
    fake.keep_bodies = False  # the fake hashes the body as it arrives, holding 64 KiB at a time
    fake.reply("POST", "/api/templates", 201, template_record())
    small = tmp_path / "small.tar"
    small.write_bytes(b"x")

    async def peak_while_importing(path: Path) -> int:
        tracemalloc.start()
        try:
            assert await Template.import_archive(as_path(path), "python", tag="3.12") == template_record()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    # What a call costs anyway (the client, its TLS context, ...), then the large upload.
    baseline = await peak_while_importing(small)
    peak = await peak_while_importing(archive)
    fake.requests.pop(0)
    request = fake.only()
    assert (request.method, request.path, request.query) == (
        "POST", "/api/templates", {"name": ["python"], "tag": ["3.12"]})
    assert request.headers["content-type"] == "application/x-tar"
    assert request.headers["content-length"] == str(size)
    assert "transfer-encoding" not in request.headers
    assert (request.body_length, request.body_sha256, request.body_incomplete) == (size, sha256, False)
    # Never the whole file in memory (let alone twice): a few chunks at most.
    assert peak - baseline < 3 * template_module.UPLOAD_CHUNK < size // 2, (baseline, peak, size)


async def test_an_empty_file_is_sent_with_content_length_zero(fake: FakeAppliance, tmp_path: Path) -> None:
    fake.reply("POST", "/api/templates", 400, {"error": "the archive is refused: it is empty"})
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(OpenComputerError) as info:
        await Template.import_archive(tmp_path / "empty.tar", "empty", rootfs=True)
    assert (info.value.status, info.value.message) == (400, "the archive is refused: it is empty")
    request = fake.only()
    assert (request.headers["content-length"], request.headers["content-type"], request.body) == ("0", ROOTFS_TYPE, b"")


async def test_a_file_that_shrinks_while_sent_fails_before_it_is_complete(
        fake: FakeAppliance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "image.tar"
    write_file(archive, 300_000)
    real_fstat = os.fstat

    def fstat_reporting_more(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        fields = list(st)
        fields[6] = st.st_size + 5  # st_size: the file "was" longer when measured
        return os.stat_result(fields)

    monkeypatch.setattr(template_module.os, "fstat", fstat_reporting_more)
    monkeypatch.setattr(template_module, "UPLOAD_CHUNK", 64 << 10)
    fake.keep_bodies = False
    fake.reply("POST", "/api/templates", 201, template_record())
    with pytest.raises(OpenComputerError) as info:
        await Template.import_archive(archive, "python")
    assert info.value.status is None
    assert info.value.message == f"{archive} became shorter while it was uploaded (300000 of 300005 bytes sent)"
    monkeypatch.undo()
    fake.wait_for_requests(1)
    request = fake.only()
    assert request.headers["content-length"] == "300005"
    assert request.body_incomplete and request.body_length == 300_000


async def test_the_chunks_never_complete_a_file_that_grew_or_shrank() -> None:
    async def sent(data: bytes, size: int) -> "tuple[list[bytes], str]":
        chunks: "list[bytes]" = []
        with pytest.raises(OpenComputerError) as info:
            async for chunk in template_module._file_chunks(io.BytesIO(data), size, "f.tar"):
                chunks.append(chunk)
        return chunks, info.value.message

    # Grown: the last chunk is withheld, so the declared length is never reached.
    assert await sent(b"x" * 11, 10) == ([], "f.tar grew while it was uploaded (it had 10 bytes)")
    chunks, message = await sent(b"x" * (template_module.UPLOAD_CHUNK + 11), template_module.UPLOAD_CHUNK + 10)
    assert [len(c) for c in chunks] == [template_module.UPLOAD_CHUNK]
    assert message.endswith("grew while it was uploaded (it had %d bytes)" % (template_module.UPLOAD_CHUNK + 10))
    assert await sent(b"x" * 5, 10) == ([b"x" * 5], "f.tar became shorter while it was uploaded (5 of 10 bytes sent)")
    assert [c async for c in template_module._file_chunks(io.BytesIO(b"y" * 10), 10, "f.tar")] == [b"y" * 10]


async def test_sources_that_cannot_be_read_fail_before_any_request(fake: FakeAppliance, tmp_path: Path) -> None:
    with pytest.raises(OpenComputerError) as info:
        await Template.import_archive(tmp_path / "missing.tar", "python")
    assert info.value.status is None
    assert info.value.message == f"cannot read {tmp_path / 'missing.tar'}: No such file or directory"
    with pytest.raises(OpenComputerError) as info:
        await Template.import_archive(str(tmp_path), "python")
    assert (info.value.status, info.value.message) == (
        None, f"cannot upload {tmp_path}: not a regular file (give its bytes instead)")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OpenComputerError) as info:
        await Template.import_archive(fifo, "python")  # refused without waiting for a writer
    assert "not a regular file" in str(info.value)
    with pytest.raises(TypeError, match="source must be a path or bytes"):
        await Template.import_archive(io.BytesIO(b"tar"), "python")  # type: ignore[arg-type]
    assert fake.requests == []


async def test_import_errors_carry_the_server_status_and_message(fake: FakeAppliance) -> None:
    for status, message in [
        (409, 'a template named "python" exists already; delete it or choose another name'),
        (413, "the archive (99 bytes) is larger than this appliance takes now: at most 10 bytes"),
        (415, 'Content-Type "text/plain" is not an archive this appliance imports'),
        (503, "sandbox runtime not available: no VMM"),
    ]:
        fake.reply("POST", "/api/templates", status, {"error": message})
        with pytest.raises(OpenComputerError) as info:
            await Template.import_archive(b"tar", "python")
        assert (info.value.status, info.value.message) == (status, message)


async def test_the_import_timeout_can_be_shortened(fake: FakeAppliance) -> None:
    fake.reply("POST", "/api/templates", 201, template_record(), delay=2.0)
    with pytest.raises(OpenComputerError) as info:
        await Template.import_archive(b"tar", "python", timeout=0.3)
    assert info.value.status is None and "timed out" in info.value.message
    assert template_module.TEMPLATE_TIMEOUT == 1800.0


async def test_shipped_or_used_templates_are_not_deleted(fake: FakeAppliance) -> None:
    fake.reply("DELETE", "/api/templates/base", 403,
               {"error": "template base is shipped with the appliance's image and cannot be deleted"})
    with pytest.raises(OpenComputerError) as info:
        await Template.delete("base")
    assert info.value.status == 403 and "cannot be deleted" in info.value.message


async def test_an_answer_of_the_wrong_shape_is_an_error(fake: FakeAppliance) -> None:
    fake.reply("GET", "/api/templates", 200, {"templates": []})
    with pytest.raises(OpenComputerError, match="expected a JSON array"):
        await Template.list()
    fake.reply("POST", "/api/templates", 201, [])
    with pytest.raises(OpenComputerError, match="expected a JSON object"):
        await Template.import_archive(b"tar", "python")


async def test_save_as_template_posts_the_name(fake: FakeAppliance) -> None:
    fake.reply("GET", f"/api/sandboxes/{SANDBOX_ID}", 200, sandbox_record())
    saved = template_record(name="snap", templateID="snap", source="sandbox", sourceDigest=f"sandbox:{SANDBOX_ID}")
    fake.reply("POST", f"/api/sandboxes/{SANDBOX_ID}/template", 201, saved)
    sandbox = await Sandbox.connect(SANDBOX_ID)
    try:
        assert await sandbox.save_as_template("snap") == saved
        request = fake.requests[-1]
        assert (request.method, request.path, request.query) == ("POST", f"/api/sandboxes/{SANDBOX_ID}/template", {})
        assert request.headers["content-type"] == "application/json"
        assert request.json == {"name": "snap"}
        assert request.headers["x-api-key"] == API_KEY
        fake.reply("POST", f"/api/sandboxes/{SANDBOX_ID}/template", 409,
                   {"error": f"sandbox {SANDBOX_ID} is stopped: only a running or hibernated sandbox has a disk to save"})
        with pytest.raises(OpenComputerError) as info:
            await sandbox.save_as_template("snap2")
        assert info.value.status == 409 and "only a running or hibernated sandbox" in info.value.message
    finally:
        await sandbox.close()
