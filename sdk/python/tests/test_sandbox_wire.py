"""Sandbox and commands: the exact requests the SDK sends and how it reads the answers."""

from __future__ import annotations

import pytest

from conftest import API_KEY, SANDBOX_ID, sandbox_record
from fake_appliance import FakeAppliance
from opencomputer import OpenComputerError, ProcessResult, Sandbox

BASE = f"/api/sandboxes/{SANDBOX_ID}"


async def test_create_sends_every_given_field_with_contract_names(fake: FakeAppliance) -> None:
    fake.reply("POST", "/api/sandboxes", 201, sandbox_record(
        templateID="python", cpuCount=2, memoryMB=1024, diskMB=4096, metadata={"owner": "ci"}))
    sandbox = await Sandbox.create(
        project="my-agent", template="python", timeout=600, envs={"A": "1"}, metadata={"owner": "ci"},
        cpu_count=2, memory_mb=1024, disk_mb=4096,
    )
    request = fake.only()
    assert (request.method, request.path) == ("POST", "/api/sandboxes")
    assert request.headers["x-api-key"] == API_KEY
    assert request.headers["content-type"] == "application/json"
    assert request.json == {
        "project": "my-agent", "templateID": "python", "timeout": 600, "envs": {"A": "1"},
        "metadata": {"owner": "ci"}, "cpuCount": 2, "memoryMB": 1024, "diskMB": 4096,
    }
    assert sandbox.sandbox_id == SANDBOX_ID
    assert (sandbox.template_id, sandbox.status, sandbox.cpu_count, sandbox.memory_mb, sandbox.disk_mb) == (
        "python", "running", 2, 1024, 4096)
    assert sandbox.metadata == {"owner": "ci"}
    assert sandbox.end_at == "2025-01-02T03:09:05Z"
    await sandbox.close()


async def test_create_without_arguments_sends_the_documented_defaults(fake: FakeAppliance) -> None:
    fake.reply("POST", "/api/sandboxes", 201, sandbox_record())
    sandbox = await Sandbox.create()
    assert fake.only().json == {"templateID": "base", "timeout": 300}
    await sandbox.close()


async def test_create_with_a_project_leaves_default_template_and_timeout_to_it(fake: FakeAppliance) -> None:
    fake.reply("POST", "/api/sandboxes", 201, sandbox_record())
    first = await Sandbox.create(project="my-agent")
    second = await Sandbox.create(project="my-agent", template="python", timeout=600)
    assert [r.json for r in fake.requests] == [
        {"project": "my-agent"},
        {"project": "my-agent", "templateID": "python", "timeout": 600},
    ]
    await first.close()
    await second.close()


async def test_create_error_carries_status_and_server_message(fake: FakeAppliance) -> None:
    fake.reply("POST", "/api/sandboxes", 404, {"error": 'project "nope" not found'})
    with pytest.raises(OpenComputerError) as info:
        await Sandbox.create(project="nope")
    assert (info.value.status, info.value.message) == (404, 'project "nope" not found')


async def test_non_json_error_body_becomes_the_message(fake: FakeAppliance) -> None:
    fake.reply("POST", "/api/sandboxes", 502, raw=b"bad gateway from a proxy", content_type="text/plain")
    with pytest.raises(OpenComputerError) as info:
        await Sandbox.create()
    assert (info.value.status, info.value.message) == (502, "bad gateway from a proxy")


async def test_connect_reads_the_record(fake: FakeAppliance) -> None:
    fake.reply("GET", BASE, 200, sandbox_record(status="stopped"))
    sandbox = await Sandbox.connect(SANDBOX_ID)
    assert fake.only().method == "GET"
    assert sandbox.status == "stopped"
    await sandbox.close()


async def test_ids_are_percent_encoded_as_one_segment(fake: FakeAppliance) -> None:
    with pytest.raises(OpenComputerError) as info:
        await Sandbox.connect("a/b c")
    assert info.value.status == 404
    assert fake.only().path == "/api/sandboxes/a%2Fb%20c"


async def test_is_running_set_timeout_and_kill(fake: FakeAppliance) -> None:
    fake.reply("GET", BASE, 200, sandbox_record())
    fake.reply("POST", f"{BASE}/timeout", 204)
    fake.reply("DELETE", BASE, 204)
    sandbox = await Sandbox.connect(SANDBOX_ID)
    assert await sandbox.is_running() is True
    await sandbox.set_timeout(900)
    await sandbox.kill()
    assert sandbox.status == "stopped"
    calls = [(r.method, r.path) for r in fake.requests]
    assert calls == [("GET", BASE), ("GET", BASE), ("POST", f"{BASE}/timeout"), ("DELETE", BASE)]
    assert fake.requests[2].json == {"timeout": 900}
    await sandbox.close()


async def test_is_running_is_false_when_stopped_or_gone_and_raises_otherwise(fake: FakeAppliance) -> None:
    fake.reply("GET", BASE, 200, sandbox_record(status="stopped"))
    sandbox = await Sandbox.connect(SANDBOX_ID)
    assert await sandbox.is_running() is False
    fake.reply("GET", BASE, 404, {"error": "gone"})
    assert await sandbox.is_running() is False
    fake.reply("GET", BASE, 401, {"error": "invalid API key"})
    with pytest.raises(OpenComputerError) as info:
        await sandbox.is_running()
    assert info.value.status == 401
    await sandbox.close()


async def test_async_with_kills_at_exit(fake: FakeAppliance) -> None:
    fake.reply("POST", "/api/sandboxes", 201, sandbox_record())
    fake.reply("DELETE", BASE, 204)
    async with await Sandbox.create() as sandbox:
        assert sandbox.sandbox_id == SANDBOX_ID
        assert [r.method for r in fake.requests] == ["POST"]
    assert [(r.method, r.path) for r in fake.requests] == [("POST", "/api/sandboxes"), ("DELETE", BASE)]


async def test_async_with_tolerates_an_already_gone_sandbox_but_not_other_errors(fake: FakeAppliance) -> None:
    fake.reply("POST", "/api/sandboxes", 201, sandbox_record())
    fake.reply("DELETE", BASE, 404, {"error": "not found"})
    async with await Sandbox.create():
        pass
    fake.reply("DELETE", BASE, 503, {"error": "sandbox runtime not available: x"})
    with pytest.raises(OpenComputerError) as info:
        async with await Sandbox.create():
            pass
    assert info.value.status == 503


async def test_commands_run_default_body_and_result(fake: FakeAppliance) -> None:
    fake.reply("POST", "/api/sandboxes", 201, sandbox_record())
    fake.reply("POST", f"{BASE}/commands", 200, {"exitCode": 0, "stdout": "hello\n", "stderr": ""})
    sandbox = await Sandbox.create()
    result = await sandbox.commands.run("echo hello")
    assert result == ProcessResult(exit_code=0, stdout="hello\n", stderr="")
    request = fake.requests[-1]
    assert request.json == {"cmd": "echo hello", "timeout": 60}
    assert request.headers["x-api-key"] == API_KEY
    await sandbox.close()


async def test_commands_run_with_env_cwd_timeout_returns_failures(fake: FakeAppliance) -> None:
    fake.reply("POST", "/api/sandboxes", 201, sandbox_record())
    fake.reply("POST", f"{BASE}/commands", 200, {"exitCode": 7, "stdout": "", "stderr": "boom"})
    sandbox = await Sandbox.create()
    result = await sandbox.commands.run("exit 7", timeout=5, env={"X": "y"}, cwd="/tmp")
    assert (result.exit_code, result.stdout, result.stderr) == (7, "", "boom")
    assert fake.requests[-1].json == {"cmd": "exit 7", "timeout": 5, "envs": {"X": "y"}, "cwd": "/tmp"}
    await sandbox.close()


async def test_commands_run_rejects_a_malformed_answer(fake: FakeAppliance) -> None:
    fake.reply("POST", "/api/sandboxes", 201, sandbox_record())
    fake.reply("POST", f"{BASE}/commands", 200, {"stdout": "no exit code"})
    sandbox = await Sandbox.create()
    with pytest.raises(OpenComputerError, match="exitCode"):
        await sandbox.commands.run("true")
    await sandbox.close()
