"""Connection settings (argument or environment) and the HTTP client every call goes through.

All API errors become :class:`OpenComputerError` here, so the other modules only deal
with successful answers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, AsyncIterable, Dict, List, Mapping, Optional, Union
from urllib.parse import quote

import httpx

from opencomputer.errors import OpenComputerError

API_URL_ENV = "OPENCOMPUTER_API_URL"
API_KEY_ENV = "OPENCOMPUTER_API_KEY"
API_KEY_HEADER = "X-API-Key"

#: Seconds an ordinary API call may take before it fails with ``status=None``.
DEFAULT_REQUEST_TIMEOUT = 60.0
#: Extra seconds granted on top of a command's own timeout, so the appliance can answer
#: with the command's result (or its timeout) before the client gives up.
COMMAND_TIMEOUT_MARGIN = 30.0
#: How much of a non-JSON error body is kept in an exception message.
MAX_ERROR_TEXT = 500


def path_segment(value: str) -> str:
    """Percent-encodes one path segment (ids and names must not add or escape segments)."""
    return quote(value, safe="")


@dataclass(frozen=True)
class ClientConfig:
    """Where the appliance is and how to authenticate to it.

    ``api_url`` always ends in ``/api``; ``api_key`` is kept out of ``repr`` so that
    printing or logging a config never shows it.
    """

    api_url: str
    api_key: Optional[str] = field(default=None, repr=False)
    timeout: float = DEFAULT_REQUEST_TIMEOUT

    @classmethod
    def resolve(cls, api_url: Optional[str] = None, api_key: Optional[str] = None) -> "ClientConfig":
        """Builds a config from the arguments, falling back to the environment.

        ``OPENCOMPUTER_API_URL`` may be given with or without the ``/api`` suffix
        (``http://host:8080`` and ``http://host:8080/api`` are the same appliance).
        There is no built-in default URL: an SDK that silently talked to some other
        host would send it the API key.
        """
        url = api_url or os.environ.get(API_URL_ENV, "")
        if not url.strip():
            raise OpenComputerError(
                None, f"no appliance URL: pass api_url=... or set {API_URL_ENV} (e.g. http://127.0.0.1:8080/api)"
            )
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        return cls(api_url=normalize_api_url(url), api_key=key or None)


def normalize_api_url(url: str) -> str:
    """Returns the API base URL: scheme and host checked, trailing ``/`` removed, ``/api`` appended if missing."""
    base = url.strip().rstrip("/")
    parsed = httpx.URL(base)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise OpenComputerError(None, f"invalid appliance URL {url!r}: expected http(s)://host[:port][/api]")
    return base if base.endswith("/api") else base + "/api"


def _error_message(response: httpx.Response) -> str:
    """The server's ``{"error": ...}`` text, or a trimmed body when the answer is not that shape."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, str):
        return error
    text = response.text.strip()
    if text:
        return text[:MAX_ERROR_TEXT]
    return response.reason_phrase or f"HTTP {response.status_code}"


class ApiClient:
    """An ``httpx.AsyncClient`` bound to one appliance, raising :class:`OpenComputerError` on failure."""

    def __init__(self, config: ClientConfig, transport: Optional[httpx.AsyncBaseTransport] = None) -> None:
        self.config = config
        headers = {API_KEY_HEADER: config.api_key} if config.api_key else {}
        self._http = httpx.AsyncClient(
            base_url=config.api_url, headers=headers, timeout=config.timeout, transport=transport
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Optional[Mapping[str, str]] = None,
        content: Optional[Union[bytes, str, AsyncIterable[bytes]]] = None,
        headers: Optional[Dict[str, str]] = None,
        timeout: Optional[float] = None,
    ) -> httpx.Response:
        """Sends one request (``path`` relative to ``/api``) and returns the successful response.

        ``content`` may be an async iterable of byte chunks (a streamed upload): give its
        ``Content-Length`` in ``headers`` when known, else it is sent chunked."""
        extra: Dict[str, Any] = {}
        if timeout is not None:
            extra["timeout"] = timeout
        try:
            response = await self._http.request(
                method, path, json=json, params=params, content=content, headers=headers, **extra
            )
        except httpx.TimeoutException as e:
            raise OpenComputerError(None, f"{method} {self.config.api_url}{path} timed out: {e}") from e
        except httpx.HTTPError as e:
            # Some httpx errors (a connection closed while the body was sent) have no text.
            raise OpenComputerError(None, f"cannot reach {self.config.api_url}: {str(e) or type(e).__name__}") from e
        if response.status_code >= 400:
            raise OpenComputerError(response.status_code, _error_message(response))
        return response

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """Sends one request and returns its decoded JSON body."""
        response = await self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as e:
            raise OpenComputerError(
                response.status_code, f"the appliance answered {method} {path} with invalid JSON"
            ) from e

    async def aclose(self) -> None:
        """Closes the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> "ApiClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def expect_dict(value: Any, what: str) -> Dict[str, Any]:
    """Checks that a JSON answer is an object."""
    if not isinstance(value, dict):
        raise OpenComputerError(None, f"unexpected answer for {what}: expected a JSON object")
    return value


def expect_list(value: Any, what: str) -> List[Any]:
    """Checks that a JSON answer is an array."""
    if not isinstance(value, list):
        raise OpenComputerError(None, f"unexpected answer for {what}: expected a JSON array")
    return value
