"""The alerts webhook (`alerts.webhook`): one JSON POST per alert, over aiohttp's client.

This module is the only other user of aiohttp's client (pyproject.toml's contract names it):
it turns every outcome into a `Reply`, as `delivery/client.py` does for SMTP, so the alerts
runner settles a webhook entry with the same queue moves as a mail:

    2xx                              Reply(250): delivered
    408, 425, 429, 5xx               Reply(451, reached): temporary, retried with a growing delay
    any other status (3xx, 4xx)      Reply(554): refused for good (redirects are not followed)
    no connection, timeout, TLS      Reply(451, reached=False): the sweep stops, retried later

The URL may carry a token (many webhook services put one in the path), so it is never logged:
the log and `server_name` say only its host. At most MAX_ANSWER bytes of an answer are read.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import aiohttp

from relay.delivery.client import Reply

MAX_ANSWER = 64 * 1024
RETRYABLE = frozenset({408, 425, 429})


class Webhook:
    """POSTs JSON bodies to one URL; `post` never raises."""

    def __init__(self, url: str, timeout: float, user_agent: str = "continuity-relay") -> None:
        self.url = url
        self.timeout = timeout
        self.server_name = urlsplit(url).hostname or "webhook"
        self.headers = {"Content-Type": "application/json", "User-Agent": user_agent}

    async def post(self, body: bytes) -> Reply:
        try:
            status = await asyncio.wait_for(self._post(body), self.timeout)
        except TimeoutError:
            return Reply(451, f"no answer from {self.server_name} within {self.timeout:g}s", reached=False)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return Reply(451, f"{type(exc).__name__} talking to {self.server_name}", reached=False)
        if 200 <= status < 300:
            return Reply(250, f"HTTP {status}")
        if status in RETRYABLE or status >= 500:
            return Reply(451, f"HTTP {status} from {self.server_name}")
        return Reply(554, f"HTTP {status} from {self.server_name}")

    async def _post(self, body: bytes) -> int:
        async with aiohttp.ClientSession() as session, \
                session.post(self.url, data=body, headers=self.headers, allow_redirects=False) as response:
            read = 0
            async for chunk in response.content.iter_any():   # drained, so the connection ends cleanly
                read += len(chunk)
                if read > MAX_ANSWER:
                    break
            return response.status
