"""Project: the exact bodies create and update send (only what is given) and the paths used."""

from __future__ import annotations

import pytest

from conftest import API_KEY
from fake_appliance import FakeAppliance
from opencomputer import OpenComputerError, Project

PID = "0b7e4d0c-6a0e-4c1f-9d52-2f1c7a9b8e11"


async def test_create_sends_contract_names_and_skips_unset_fields(fake: FakeAppliance) -> None:
    fake.reply("POST", "/api/projects", 201, {"id": PID, "name": "p"})
    assert await Project.create("p") == {"id": PID, "name": "p"}
    assert fake.requests[-1].json == {"name": "p"}
    await Project.create("p", template="python", cpu_count=2, memory_mb=2048, timeout_sec=900,
                         egress_allowlist=["api.anthropic.com"])
    request = fake.requests[-1]
    assert request.json == {"name": "p", "template": "python", "cpuCount": 2, "memoryMB": 2048,
                            "timeoutSec": 900, "egressAllowlist": ["api.anthropic.com"]}
    assert request.headers["x-api-key"] == API_KEY


async def test_update_sends_only_what_is_passed(fake: FakeAppliance) -> None:
    fake.reply("PUT", f"/api/projects/{PID}", 200, {"id": PID})
    await Project.update(PID, memory_mb=4096)
    assert fake.requests[-1].json == {"memoryMB": 4096}
    await Project.update(PID, name="", template="", cpu_count=0, timeout_sec=0, egress_allowlist=None)
    assert fake.requests[-1].json == {}
    await Project.update(PID, name="renamed", egress_allowlist=["*.example.com"])
    assert fake.requests[-1].json == {"name": "renamed", "egressAllowlist": ["*.example.com"]}


async def test_secret_paths_and_bodies(fake: FakeAppliance) -> None:
    fake.reply("PUT", f"/api/projects/{PID}/secrets/API_KEY", 204)
    fake.reply("GET", f"/api/projects/{PID}/secrets", 200, [{"name": "API_KEY", "allowedHosts": ["api.example.com"]}])
    fake.reply("DELETE", f"/api/projects/{PID}/secrets/API_KEY", 204)
    fake.reply("DELETE", f"/api/projects/{PID}", 204)
    assert await Project.set_secret(PID, "API_KEY", "sk-value") is None
    assert fake.requests[-1].json == {"value": "sk-value"}, "allowedHosts only when given"
    assert await Project.set_secret(PID, "API_KEY", "sk-value", allowed_hosts=("api.example.com", "db.example.com:5432")) is None
    assert fake.requests[-1].json == {"value": "sk-value", "allowedHosts": ["api.example.com", "db.example.com:5432"]}
    assert await Project.set_secret(PID, "API_KEY", "sk-value", allowed_hosts=[]) is None
    assert fake.requests[-1].json == {"value": "sk-value", "allowedHosts": []}
    assert await Project.list_secrets(PID) == [{"name": "API_KEY", "allowedHosts": ["api.example.com"]}]
    assert await Project.delete_secret(PID, "API_KEY") is None
    assert await Project.delete(PID) is None
    assert [(r.method, r.path) for r in fake.requests] == [
        ("PUT", f"/api/projects/{PID}/secrets/API_KEY"),
        ("PUT", f"/api/projects/{PID}/secrets/API_KEY"),
        ("PUT", f"/api/projects/{PID}/secrets/API_KEY"),
        ("GET", f"/api/projects/{PID}/secrets"),
        ("DELETE", f"/api/projects/{PID}/secrets/API_KEY"),
        ("DELETE", f"/api/projects/{PID}"),
    ]


async def test_secret_lists_of_bare_names_still_work(fake: FakeAppliance) -> None:
    # What appliances answered before per-secret hosts existed.
    fake.reply("GET", f"/api/projects/{PID}/secrets", 200, ["A", "B"])
    assert await Project.list_secrets(PID) == [{"name": "A", "allowedHosts": []}, {"name": "B", "allowedHosts": []}]
    fake.reply("GET", f"/api/projects/{PID}/secrets", 200, [7])
    with pytest.raises(OpenComputerError, match="expected a JSON object"):
        await Project.list_secrets(PID)


async def test_an_answer_of_the_wrong_shape_is_an_error(fake: FakeAppliance) -> None:
    fake.reply("GET", "/api/projects", 200, {"not": "a list"})
    with pytest.raises(OpenComputerError, match="expected a JSON array"):
        await Project.list()
    fake.reply("GET", f"/api/projects/{PID}", 200, raw=b"<html>", content_type="text/html")
    with pytest.raises(OpenComputerError, match="invalid JSON"):
        await Project.get(PID)
