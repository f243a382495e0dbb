"""ASGI middleware of the server: the request body limit."""

from __future__ import annotations

import json
from typing import Any

from lipkit.serve.limits import ApiError


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 before the app reads them.

    The declared ``Content-Length`` is checked first; a body without one (chunked) is read up to the limit
    and replayed to the app, so no route ever sees more than ``max_bytes``.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send, declared)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(send, size)
                return
            if not message.get("more_body", False):
                break
        replay = iter(messages)

        async def receive_again() -> dict[str, Any]:
            return next(replay, None) or await receive()

        await self.app(scope, receive_again, send)

    async def _refuse(self, send: Any, size: int) -> None:
        error = ApiError(413, "too_large", f"the request body is over the limit of {self.max_bytes} bytes")
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: dict[str, Any]) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
