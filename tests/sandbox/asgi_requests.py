"""Run a `requests`-based third-party client against an ASGI emulator in-process, with no sockets.

`requests` is synchronous and the emulators are ASGI apps: the app runs on its
own event loop in a background thread, and `AsgiAdapter` (a `requests` transport
adapter, the seam `requests` offers for this) hands each request to it through
`httpx.ASGITransport`. The client under test is unchanged: it still builds its
own `requests.Session`; `sessions_through(app)` makes every session created in
the block send through the adapter.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from starlette.types import ASGIApp


class AppLoop:
    """An event loop in a daemon thread that owns the app and an httpx client for it."""

    def __init__(self, app: ASGIApp) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = self.run(self._client(app))

    @staticmethod
    async def _client(app: ASGIApp) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app))

    def run(self, coroutine: Any) -> Any:
        """Run a coroutine on the app's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def close(self) -> None:
        self.run(self.client.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class AsgiAdapter(BaseAdapter):
    """A `requests` adapter that answers from the ASGI app instead of the network."""

    def __init__(self, app_loop: AppLoop) -> None:
        super().__init__()
        self.app_loop = app_loop
        self.sent: list[tuple[str, str]] = []

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        body = request.body.encode() if isinstance(request.body, str) else request.body
        self.sent.append((str(request.method), str(request.url)))
        answer: httpx.Response = self.app_loop.run(
            self.app_loop.client.request(
                str(request.method), str(request.url), headers=dict(request.headers), content=body or b""
            )
        )
        response = requests.Response()
        response.status_code = answer.status_code
        response.headers = CaseInsensitiveDict(answer.headers.items())
        response._content = answer.content
        response.url = str(request.url)
        response.request = request
        response.reason = answer.reason_phrase
        response.encoding = answer.encoding
        return response

    def close(self) -> None:
        """Nothing to release: the app loop outlives the sessions."""


@contextmanager
def sessions_through(app: ASGIApp) -> Iterator[AsgiAdapter]:
    """Within the block, every new `requests.Session` sends http(s) requests to `app`."""
    app_loop = AppLoop(app)
    adapter = AsgiAdapter(app_loop)
    original = requests.Session.__init__

    def init(session: requests.Session) -> None:
        original(session)
        session.mount("https://", adapter)
        session.mount("http://", adapter)

    requests.Session.__init__ = init  # type: ignore[method-assign]
    try:
        yield adapter
    finally:
        requests.Session.__init__ = original  # type: ignore[method-assign]
        app_loop.close()
