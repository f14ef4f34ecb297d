"""sandbox.files: raw bodies, the ?path= query, list parsing and exists()."""

from __future__ import annotations

from typing import AsyncIterator

import pytest

from conftest import SANDBOX_ID, sandbox_record
from fake_appliance import FakeAppliance
from opencomputer import EntryInfo, OpenComputerError, Sandbox

FILES = f"/api/sandboxes/{SANDBOX_ID}/files"


@pytest.fixture
async def sandbox(fake: FakeAppliance) -> AsyncIterator[Sandbox]:
    fake.reply("GET", f"/api/sandboxes/{SANDBOX_ID}", 200, sandbox_record())
    sb = await Sandbox.connect(SANDBOX_ID)
    fake.requests.clear()
    yield sb
    await sb.close()


async def test_write_sends_raw_bytes_with_the_path_in_the_query(fake: FakeAppliance, sandbox: Sandbox) -> None:
    fake.reply("PUT", FILES, 204)
    blob = bytes(range(256))
    await sandbox.files.write("/tmp/dir with space/a&b.bin", blob)
    request = fake.only()
    assert request.method == "PUT"
    assert request.query == {"path": ["/tmp/dir with space/a&b.bin"]}
    assert request.body == blob
    assert request.headers["content-type"] == "application/octet-stream"


async def test_write_str_is_utf8(fake: FakeAppliance, sandbox: Sandbox) -> None:
    fake.reply("PUT", FILES, 204)
    await sandbox.files.write("notes.txt", "héllo ✓")
    assert fake.only().body == "héllo ✓".encode("utf-8")


async def test_read_and_read_bytes(fake: FakeAppliance, sandbox: Sandbox) -> None:
    fake.reply("GET", FILES, 200, raw="grüße\n".encode("utf-8"), content_type="application/octet-stream")
    assert await sandbox.files.read("/etc/motd") == "grüße\n"
    assert fake.requests[-1].query == {"path": ["/etc/motd"]}
    fake.reply("GET", FILES, 200, raw=b"\x00\xff\xfe", content_type="application/octet-stream")
    assert await sandbox.files.read_bytes("/bin/x") == b"\x00\xff\xfe"
    with pytest.raises(OpenComputerError, match="read_bytes"):
        await sandbox.files.read("/bin/x")


async def test_read_of_a_missing_file_raises_404(fake: FakeAppliance, sandbox: Sandbox) -> None:
    fake.reply("GET", FILES, 404, {"error": "no such file: /nope"})
    with pytest.raises(OpenComputerError) as info:
        await sandbox.files.read("/nope")
    assert (info.value.status, info.value.message) == (404, "no such file: /nope")


async def test_list_make_dir_remove(fake: FakeAppliance, sandbox: Sandbox) -> None:
    fake.reply("GET", f"{FILES}/list", 200, [
        {"name": "a.txt", "isDir": False, "path": "/w/a.txt", "size": 5},
        {"name": "sub", "isDir": True, "path": "/w/sub", "size": 0},
    ])
    fake.reply("POST", f"{FILES}/mkdir", 204)
    fake.reply("DELETE", FILES, 204)
    entries = await sandbox.files.list("/w")
    assert entries == [EntryInfo("a.txt", False, "/w/a.txt", 5), EntryInfo("sub", True, "/w/sub", 0)]
    await sandbox.files.make_dir("/w/new/deep")
    await sandbox.files.remove("/w/a.txt")
    calls = [(r.method, r.path, r.query["path"][0]) for r in fake.requests]
    assert calls == [
        ("GET", f"{FILES}/list", "/w"),
        ("POST", f"{FILES}/mkdir", "/w/new/deep"),
        ("DELETE", FILES, "/w/a.txt"),
    ]


async def test_exists_looks_the_name_up_in_its_parent(fake: FakeAppliance, sandbox: Sandbox) -> None:
    fake.reply("GET", f"{FILES}/list", 200, [{"name": "sub", "isDir": True, "path": "/w/sub", "size": 0}])
    assert await sandbox.files.exists("/w/sub/") is True
    assert fake.requests[-1].query == {"path": ["/w"]}
    assert await sandbox.files.exists("/w/other") is False
    assert await sandbox.files.exists("relative") is False
    assert fake.requests[-1].query == {"path": ["."]}
    assert await sandbox.files.exists("/") is True
    assert fake.requests[-1].query == {"path": ["/"]}


async def test_exists_is_false_for_a_missing_parent_and_raises_on_other_errors(
    fake: FakeAppliance, sandbox: Sandbox
) -> None:
    fake.reply("GET", f"{FILES}/list", 404, {"error": "directory /nope does not exist"})
    assert await sandbox.files.exists("/nope/x") is False
    fake.reply("GET", f"{FILES}/list", 409, {"error": "sandbox is stopped"})
    with pytest.raises(OpenComputerError) as info:
        await sandbox.files.exists("/w/x")
    assert info.value.status == 409
