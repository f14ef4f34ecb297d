"""Configuration: arguments over environment, URL normalisation, the key kept out of repr."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from opencomputer import ClientConfig, OpenComputerError, Project


def test_environment_is_used_when_no_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENCOMPUTER_API_URL", "http://10.0.0.5:8080/api/")
    monkeypatch.setenv("OPENCOMPUTER_API_KEY", "env-key")
    config = ClientConfig.resolve()
    assert config.api_url == "http://10.0.0.5:8080/api"
    assert config.api_key == "env-key"


def test_arguments_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENCOMPUTER_API_URL", "http://env-host/api")
    monkeypatch.setenv("OPENCOMPUTER_API_KEY", "env-key")
    config = ClientConfig.resolve(api_url="https://arg-host:9443", api_key="arg-key")
    assert config.api_url == "https://arg-host:9443/api"
    assert config.api_key == "arg-key"


def test_missing_url_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENCOMPUTER_API_URL", raising=False)
    with pytest.raises(OpenComputerError) as info:
        ClientConfig.resolve()
    assert info.value.status is None
    assert "OPENCOMPUTER_API_URL" in info.value.message


@pytest.mark.parametrize("bad", ["ftp://host/api", "not a url", "http:///api"])
def test_invalid_url_is_rejected(bad: str) -> None:
    with pytest.raises(OpenComputerError, match="invalid appliance URL"):
        ClientConfig.resolve(api_url=bad)


def test_api_key_is_not_in_repr() -> None:
    config = ClientConfig.resolve(api_url="http://h/api", api_key="super-secret-key")
    assert "super-secret-key" not in repr(config)
    assert "http://h/api" in repr(config)


async def test_unreachable_appliance_raises_without_status() -> None:
    # A port that was just free: bound, then closed without listening.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OpenComputerError) as info:
        await Project.list(api_url=f"http://127.0.0.1:{port}/api", api_key="k")
    assert info.value.status is None
    assert f"cannot reach http://127.0.0.1:{port}/api" in info.value.message


def test_installed_package_ships_its_type_marker() -> None:
    import opencomputer

    assert (Path(opencomputer.__file__).parent / "py.typed").is_file()
