"""Shared fixtures: the recording fake appliance, with the SDK configured through the environment."""

from __future__ import annotations

from typing import Iterator

import pytest

from fake_appliance import FakeAppliance

API_KEY = "test-key-0123456789abcdef"
SANDBOX_ID = "6f9619ff-8b86-d011-b42d-00c04fc964ff"


def sandbox_record(**overrides: object) -> dict:
    record = {
        "sandboxID": SANDBOX_ID,
        "templateID": "base",
        "status": "running",
        "startedAt": "2025-01-02T03:04:05Z",
        "endAt": "2025-01-02T03:09:05Z",
        "cpuCount": 1,
        "memoryMB": 512,
        "diskMB": 2048,
        "metadata": {},
    }
    record.update(overrides)
    return record


def template_record(**overrides: object) -> dict:
    """A template made on the appliance, as `GET /api/templates/{name}` answers it."""
    record = {
        "templateID": "python",
        "name": "python",
        "tag": "latest",
        "status": "ready",
        "builtIn": False,
        "source": "docker-archive",
        "sourceDigest": "sha256:" + "ab" * 32,
        "sizeBytes": 123456789,
        "diskMB": 2048,
        "createdAt": "2025-01-02T03:04:05Z",
        "defaults": {"env": {"PATH": "/usr/local/bin:/usr/bin:/bin"}, "workingDir": "/app", "user": "1000",
                     "entrypoint": ["python3"], "cmd": ["-V"]},
    }
    record.update(overrides)
    return record


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAppliance]:
    server = FakeAppliance()
    server.start()
    monkeypatch.setenv("OPENCOMPUTER_API_URL", server.url)
    monkeypatch.setenv("OPENCOMPUTER_API_KEY", API_KEY)
    try:
        yield server
    finally:
        server.stop()
    assert not server.errors, server.errors
