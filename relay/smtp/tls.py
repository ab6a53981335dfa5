"""The server side of TLS from `tls.cert` and `tls.key`, and its reload without a restart.

`ServerTLS` owns the SSLContext that STARTTLS on both SMTP listeners (and HTTPS on the web
listener, with `web.tls`) hand out. `reload()` (on SIGHUP, see app.py) reads both files again
into a new context and swaps it in only when that worked:
  - success: the next handshake serves the new certificate (`tls.reloaded`); connections
    already encrypted keep the one they started with;
  - failure (a file missing or unreadable, a key that does not match): the old context stays,
    and `tls.reload_failed` is logged at ERROR with the reason. Nothing is written anywhere.

The SMTP factories read `.context` for each new connection. A listener that was handed one
context for good (aiohttp's HTTPS site) serves the current one all the same: every context made
here carries an SNI callback that moves each handshake onto the current context.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from relay.errors import RelayError
from relay.log import event


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The server side of STARTTLS: TLS 1.2 or later, no client certificates."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise RelayError(f"tls: cannot load certificate {cert} with key {key}: {exc}") from None
    return context


class ServerTLS:
    """The current server context for `cert` and `key`; raises RelayError at construction
    when they cannot be loaded (the relay then does not start)."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self.context = self._load()

    def reload(self) -> bool:
        """Read the files again; True when the new context is now current. Blocking file
        reads: call it in a worker thread (an assignment is all the loop ever sees)."""
        try:
            context = self._load()
        except RelayError as exc:
            event("tls.reload_failed", logging.ERROR, cert=self.cert, detail=exc)
            return False
        self.context = context
        event("tls.reloaded", cert=self.cert)
        return True

    def _load(self) -> ssl.SSLContext:
        context = tls_context(self.cert, self.key)
        context.sni_callback = self._to_current
        return context

    def _to_current(self, connection: ssl.SSLObject, server_name: str | None,
                    context: ssl.SSLContext) -> None:
        """Called by OpenSSL on every ClientHello, with or without SNI."""
        current = self.context
        if context is not current:
            connection.context = current
