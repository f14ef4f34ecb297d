"""Projects, secrets and errors against the REAL appliance control plane (`appliance serve`),
over HTTPS with the certificate it generates (trusted the documented way: SSL_CERT_FILE).

The binary comes from OPENCOMPUTER_APPLIANCE_BIN. Sandboxes cannot run on the host (no
VMM, no CA roots given), so the appliance answers sandbox and template routes with 503 and
the reason; the tests check that this reaches the caller as a typed error with that exact
message, and that what the template upload checks before needing the runtime (content type,
name, tag) is refused with its own status.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from opencomputer import OpenComputerError, Project, Sandbox, Template
from opencomputer.client import ApiClient, ClientConfig

ADMIN_KEY = "sdk-test-admin-key-" + uuid.uuid4().hex
START_TIMEOUT = 30.0


@dataclass
class RunningAppliance:
    url: str
    unavailable_reason: str
    log: Path
    #: The API CA the appliance wrote with --tls-trust-out, and the fingerprint it printed.
    trust_file: Path
    fingerprint: str


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAppliance]:
    binary = os.environ.get("OPENCOMPUTER_APPLIANCE_BIN")
    if not binary:
        pytest.skip("OPENCOMPUTER_APPLIANCE_BIN is not set (path of the built `appliance` binary)")
    if not os.access(binary, os.X_OK):
        pytest.fail(f"OPENCOMPUTER_APPLIANCE_BIN={binary} is not an executable file")
    tmp = tmp_path_factory.mktemp("appliance")
    key_file = tmp / "admin.key"
    key_file.write_text(ADMIN_KEY + "\n")
    key_file.chmod(0o600)
    missing = tmp / "missing"
    log = tmp / "appliance.log"
    trust_file = tmp / "api-ca.pem"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", str(tmp / "data"),
             "--admin-key-file", str(key_file), "--vmm-bin", str(missing), "--guest-kernel", str(missing),
             "--proxy-config", str(missing), "--ca-roots", str(missing), "--templates-dir", str(missing),
             "--tls-trust-out", str(trust_file)],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        text = ""
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            listening = re.search(r"appliance: listening on (https://[0-9.]+:[0-9]+)", text)
            if listening:
                break
            if proc.poll() is not None:
                pytest.fail(f"appliance exited with {proc.returncode}:\n{text}")
            time.sleep(0.05)
        else:
            pytest.fail(f"appliance did not start within {START_TIMEOUT} s:\n{text}")
        reason = re.search(r"SANDBOXES UNAVAILABLE: (.*); sandbox routes will answer 503", text)
        assert reason, f"the appliance did not report why sandboxes are unavailable:\n{text}"
        printed = re.search(r"API TLS: API CA SHA-256 fingerprint ([0-9A-F:]+)", text)
        assert printed, f"the appliance did not print its CA's fingerprint:\n{text}"
        yield RunningAppliance(url=listening.group(1) + "/api", unavailable_reason=reason.group(1), log=log,
                               trust_file=trust_file, fingerprint=printed.group(1))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def env(appliance: RunningAppliance, monkeypatch: pytest.MonkeyPatch) -> RunningAppliance:
    monkeypatch.setenv("OPENCOMPUTER_API_URL", appliance.url)
    monkeypatch.setenv("OPENCOMPUTER_API_KEY", ADMIN_KEY)
    monkeypatch.setenv("SSL_CERT_FILE", str(appliance.trust_file))
    return appliance


def test_the_trusted_file_is_the_ca_whose_fingerprint_was_printed(env: RunningAppliance) -> None:
    der = ssl.PEM_cert_to_DER_cert(env.trust_file.read_text())
    digest = hashlib.sha256(der).hexdigest().upper()
    assert ":".join(digest[i:i + 2] for i in range(0, len(digest), 2)) == env.fingerprint


async def test_without_trusting_the_ca_the_sdk_refuses_the_connection(
        env: RunningAppliance, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE")
    with pytest.raises(OpenComputerError) as info:
        await Project.list()
    assert info.value.status is None and "CERTIFICATE_VERIFY_FAILED" in info.value.message


async def test_plain_http_to_the_https_port_is_told_to_use_https(
        env: RunningAppliance, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENCOMPUTER_API_URL", env.url.replace("https://", "http://"))
    with pytest.raises(OpenComputerError) as info:
        await Project.list()
    assert info.value.status == 400 and "https://" in info.value.message


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_project_lifecycle(env: RunningAppliance) -> None:
    name = unique("agent")
    created = await Project.create(name, cpu_count=2, memory_mb=1024, timeout_sec=600,
                                   egress_allowlist=["api.anthropic.com"])
    assert uuid.UUID(created["id"])
    assert (created["name"], created["template"], created["cpuCount"], created["memoryMB"], created["timeoutSec"]) == (
        name, "base", 2, 1024, 600)
    assert created["egressAllowlist"] == ["api.anthropic.com"]
    assert created["createdAt"].endswith("Z") and created["updatedAt"]

    assert await Project.get(created["id"]) == created
    assert created["id"] in [p["id"] for p in await Project.list()]

    updated = await Project.update(created["id"], memory_mb=2048)
    assert updated["memoryMB"] == 2048
    # Only memory changed; everything not passed kept its value.
    for field in ("name", "template", "cpuCount", "timeoutSec", "egressAllowlist", "createdAt"):
        assert updated[field] == created[field], field
    renamed = await Project.update(created["id"], name=name + "-2", egress_allowlist=["*.example.com"])
    assert (renamed["name"], renamed["egressAllowlist"], renamed["memoryMB"]) == (name + "-2", ["*.example.com"], 2048)

    assert await Project.delete(created["id"]) is None
    with pytest.raises(OpenComputerError) as info:
        await Project.get(created["id"])
    assert (info.value.status, info.value.message) == (404, f"project {created['id']} not found")


async def test_secrets_come_back_as_names_and_hosts_only(env: RunningAppliance) -> None:
    project = await Project.create(unique("secrets"), egress_allowlist=["api.anthropic.com"])
    value = "sk-ant-" + uuid.uuid4().hex
    assert await Project.set_secret(project["id"], "ANTHROPIC_API_KEY", value) is None
    await Project.set_secret(
        project["id"], "OTHER", "v2-" + uuid.uuid4().hex, allowed_hosts=["API.example.com", "db.example.com:5432"]
    )
    assert await Project.list_secrets(project["id"]) == [
        {"name": "ANTHROPIC_API_KEY", "allowedHosts": []},
        {"name": "OTHER", "allowedHosts": ["api.example.com", "db.example.com:5432"]},
    ]
    answers = json.dumps([await Project.get(project["id"]), await Project.list(), await Project.list_secrets(project["id"])])
    assert value not in answers
    assert await Project.delete_secret(project["id"], "OTHER") is None
    assert [s["name"] for s in await Project.list_secrets(project["id"])] == ["ANTHROPIC_API_KEY"]
    with pytest.raises(OpenComputerError) as info:
        await Project.delete_secret(project["id"], "OTHER")
    assert info.value.status == 404 and "secret OTHER not found" in info.value.message
    await Project.delete(project["id"])
    # The appliance's own log never shows the value either.
    assert value not in env.log.read_text(errors="replace")


async def test_host_patterns_over_public_suffixes_or_bad_ports_are_refused(env: RunningAppliance) -> None:
    project = await Project.create(unique("hosts"))
    for bad in ["*.com", "*.co.uk", "api.example.com:99999"]:
        with pytest.raises(OpenComputerError) as info:
            await Project.set_secret(project["id"], "K", "v-" + uuid.uuid4().hex, allowed_hosts=[bad])
        assert info.value.status == 400 and "allowedHosts" in info.value.message and bad in info.value.message
        with pytest.raises(OpenComputerError) as info:
            await Project.update(project["id"], egress_allowlist=[bad])
        assert info.value.status == 400 and "egressAllowlist" in info.value.message and bad in info.value.message
    assert await Project.list_secrets(project["id"]) == []
    assert (await Project.get(project["id"]))["egressAllowlist"] == []
    await Project.delete(project["id"])


async def test_server_errors_are_typed_with_status_and_message(env: RunningAppliance) -> None:
    name = unique("dup")
    project = await Project.create(name)
    with pytest.raises(OpenComputerError) as info:
        await Project.create(name)
    assert (info.value.status, info.value.message) == (409, f'a project named "{name}" already exists')
    with pytest.raises(OpenComputerError) as info:
        await Project.get("not-a-uuid")
    assert (info.value.status, info.value.message) == (400, 'invalid project id "not-a-uuid": expected a UUID')
    with pytest.raises(OpenComputerError) as info:
        await Project.create("bad name")
    assert info.value.status == 400 and "invalid project name" in info.value.message
    with pytest.raises(OpenComputerError) as info:
        await Project.set_secret(project["id"], "1BAD", "x")
    assert info.value.status == 400 and "invalid secret name" in info.value.message
    await Project.delete(project["id"])


async def test_authentication_failures_are_401(env: RunningAppliance) -> None:
    with pytest.raises(OpenComputerError) as info:
        await Project.list(api_key="wrong-key-wrong-key")
    assert (info.value.status, info.value.message) == (401, "invalid API key")
    with pytest.raises(OpenComputerError) as info:
        await Project.list(api_key="")
    assert (info.value.status, info.value.message) == (401, "missing X-API-Key header")


async def test_url_without_api_suffix_reaches_the_same_appliance(env: RunningAppliance) -> None:
    bare = env.url[: -len("/api")] + "/"
    assert isinstance(await Project.list(api_url=bare), list)


async def test_sandbox_routes_answer_503_with_the_reason(env: RunningAppliance) -> None:
    expected = f"sandbox runtime not available: {env.unavailable_reason}"
    with pytest.raises(OpenComputerError) as info:
        await Sandbox.create(timeout=60)
    assert (info.value.status, info.value.message) == (503, expected)
    project = await Project.create(unique("sbx"))
    with pytest.raises(OpenComputerError) as info:
        await Sandbox.create(project=project["name"], cpu_count=1, memory_mb=256)
    assert (info.value.status, info.value.message) == (503, expected)
    await Project.delete(project["id"])


async def test_sandbox_lookups_fail_cleanly(env: RunningAppliance) -> None:
    with pytest.raises(OpenComputerError) as info:
        await Sandbox.create(project=unique("no-such-project"))
    assert info.value.status == 404 and "not found" in info.value.message
    missing = str(uuid.uuid4())
    with pytest.raises(OpenComputerError) as info:
        await Sandbox.connect(missing)
    assert (info.value.status, info.value.message) == (404, f"sandbox {missing} not found")


async def test_template_routes_answer_503_with_the_reason(env: RunningAppliance) -> None:
    expected = (503, f"sandbox runtime not available: {env.unavailable_reason}")
    calls = [
        lambda: Template.list(),
        lambda: Template.get("base"),
        lambda: Template.delete("made-here"),
        lambda: Template.import_archive(b"not really a tar", "python"),
        lambda: Template.import_archive(b"not really a tar", "alpine", tag="3.20", rootfs=True),
    ]
    for call in calls:
        with pytest.raises(OpenComputerError) as info:
            await call()
        assert (info.value.status, info.value.message) == expected
    # A handle on a sandbox id the appliance never made: saving needs the runtime first.
    client = ApiClient(ClientConfig.resolve())
    sandbox = Sandbox(client, {"sandboxID": str(uuid.uuid4())})
    try:
        with pytest.raises(OpenComputerError) as info:
            await sandbox.save_as_template("snap")
        assert (info.value.status, info.value.message) == expected
    finally:
        await sandbox.close()


async def test_a_streamed_upload_refused_before_its_body_is_read_still_gets_the_answer(
        env: RunningAppliance, tmp_path: Path) -> None:
    # The appliance answers before reading the body; the client has sent all of it by then.
    archive = tmp_path / "image.tar"
    with open(archive, "wb") as f:
        for i in range(6):
            f.write(bytes([i]) * (1 << 20))
    with pytest.raises(OpenComputerError) as info:
        await Template.import_archive(archive, "python")
    assert (info.value.status, info.value.message) == (503, f"sandbox runtime not available: {env.unavailable_reason}")
    with pytest.raises(OpenComputerError) as info:
        await Template.import_archive(archive, "bad name")
    assert (info.value.status, info.value.message) == (400, 'invalid template "bad name"')
    # The connection pool is still usable afterwards.
    assert isinstance(await Project.list(), list)


async def test_template_uploads_are_checked_before_the_runtime_is_needed(env: RunningAppliance) -> None:
    # The handler checks the content type, then the name, then the tag, and only then needs the runtime.
    for name in ["bad name", ".hidden", "x" * 65, "a/b"]:
        with pytest.raises(OpenComputerError) as info:
            await Template.import_archive(b"tar", name)
        assert (info.value.status, info.value.message) == (400, f"invalid template {json.dumps(name)}"), name
    with pytest.raises(OpenComputerError) as info:
        await Template.import_archive(b"tar", "")
    assert info.value.status == 400 and info.value.message.startswith("name is required")
    with pytest.raises(OpenComputerError) as info:
        await Template.import_archive(b"tar", "python", tag="t" * 129)
    assert (info.value.status, info.value.message) == (400, "tag must be 1-128 bytes without control characters")
    async with ApiClient(ClientConfig.resolve()) as client:
        # A JSON body is the hosted API's Dockerfile build, which the appliance does not do.
        with pytest.raises(OpenComputerError) as info:
            await client.request("POST", "/templates", params={"name": "python"},
                                 json={"name": "python", "dockerfile": "FROM python:3.12"})
        assert info.value.status == 400
        assert info.value.message.startswith("this appliance does not build templates from Dockerfiles")
        assert "application/x-tar" in info.value.message
        # The content type is checked before the name.
        with pytest.raises(OpenComputerError) as info:
            await client.request("POST", "/templates", params={"name": "bad name"}, content=b"x",
                                 headers={"Content-Type": "text/plain"})
        assert info.value.status == 415
        assert info.value.message.startswith('Content-Type "text/plain" is not an archive this appliance imports')
        with pytest.raises(OpenComputerError) as info:
            await client.request("POST", "/templates", params={"name": "python"}, content=b"x")
        assert (info.value.status, info.value.message[:28]) == (415, 'Content-Type "" is not an ar')
    # Saving a sandbox checks its id first.
    sandbox = Sandbox(ApiClient(ClientConfig.resolve()), {"sandboxID": "not-a-uuid"})
    try:
        with pytest.raises(OpenComputerError) as info:
            await sandbox.save_as_template("snap")
        assert (info.value.status, info.value.message) == (400, 'invalid sandbox id "not-a-uuid": expected a UUID')
    finally:
        await sandbox.close()
