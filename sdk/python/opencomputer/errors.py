"""The one exception type the SDK raises for failed API calls."""

from __future__ import annotations

from typing import Optional


class OpenComputerError(Exception):
    """An API call failed.

    ``status`` is the HTTP status the appliance answered with (400, 401, 403, 404,
    409, 413, 422, 500, 503, ...), or ``None`` when no HTTP answer arrived at all
    (connection refused, timeout, broken stream). ``message`` is the server's
    ``{"error": ...}`` text when it sent one, otherwise a description of what went wrong.
    """

    def __init__(self, status: Optional[int], message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"{status} {message}" if status is not None else message)
