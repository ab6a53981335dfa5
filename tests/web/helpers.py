"""What the web tests share: users and an administrator with cheap hashes, the web server on a
loop in a background thread (watched for blocking calls), and a small HTTP client that keeps
cookies and fills in the CSRF token the way a browser submitting the page's form would.

The fixtures that use these are in tests/web/conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
import html
import http.client
import re
import ssl
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from urllib.parse import urlencode

import bcrypt

from relay.addresses import parse_mailbox
from relay.admins import Admins
from relay.auth import LoginThrottle
from relay.config import Config
from relay.directory import Directory, User
from relay.web import start_web
from tests.loopwatch import no_blocking_calls_on_loops, watch_thread

ADMIN, ADMIN_PASSWORD = "root@admins.example.net", "admin pass 1"
USERS = {"alice@example.com": "alice pass 1", "bob@example.com": "bob pass 1"}
WEB_CONFIG = """\
web: {secret_file: etc/web.secret, session_lifetime: 1h}
admins_file: etc/admins.passwd
audit_log: log/audit.log
"""


def cheap_hash(password: str) -> str:
    """A hash verify_password accepts, made cheap (bcrypt reads the cost from the hash)."""
    return "{BLF-CRYPT}" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()


class Clock:
    """A settable time.time for session lifetimes."""

    def __init__(self) -> None:
        import time
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def watching_the_loop(started: list) -> Iterator[None]:
    """Stop every server started inside, then fail if one of them made a blocking call (a hash
    check, an fsync, a file read) on its event loop's thread."""
    with no_blocking_calls_on_loops() as blocking:
        try:
            yield
        finally:
            for server in started:
                server.stop()
        assert blocking == [], f"blocking calls on the event loop: {blocking}"


class WebServer:
    """`start_web` on its own loop in a thread, watched for blocking calls."""

    def __init__(self, config: Config, throttle: LoginThrottle, clock: Clock,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.directory = Directory(config)
        self.admins = Admins(config)
        self.throttle = throttle
        self.clock = clock
        self.ssl_context = ssl_context
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner = None

    def start(self) -> WebServer:
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(start_web(
            self.config, self.directory, self.admins, self.throttle, ssl_context=self.ssl_context,
            clock=self.clock), self.loop).result(10)
        watch_thread(self.thread)       # requests on, start-up (one-off) not
        return self

    @property
    def port(self) -> int:
        return self.runner.addresses[0][1]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def audit_lines(self) -> list[str]:
        path = self.config.audit_log
        return path.read_text().splitlines() if path.exists() else []


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: str
    set_cookies: list[str] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def location(self) -> str | None:
        return self.headers.get("Location")

    @property
    def text(self) -> str:
        """The body without tags, entities decoded, spaces collapsed: what a reader sees."""
        return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", self.body)).split())


class Client:
    """One browser: a cookie jar and the CSRF token of the last page it saw."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None, peer: str = "127.0.0.1") -> None:
        self.port, self.tls, self.peer = port, tls, peer
        self.cookies: dict[str, str] = {}
        self.csrf: str | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.tls is not None:
            return http.client.HTTPSConnection("localhost", self.port, context=self.tls, timeout=30,
                                               source_address=(self.peer, 0))
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30, source_address=(self.peer, 0))

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        headers = {"Connection": "close", **(headers or {})}     # one request per connection
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        conn = self._connection()
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            reply = Reply(response.status, response.headers, response.read().decode("utf-8"),
                          response.headers.get_all("Set-Cookie") or [])
        finally:
            conn.close()
        for line in reply.set_cookies:
            for name, morsel in SimpleCookie(line).items():
                if morsel["max-age"] == "0":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        token = re.search(r'name="csrf" value="([^"]+)"', reply.body)
        if token:
            self.csrf = token.group(1)
        return reply

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, fields: dict[str, str] | None = None, *, csrf: bool | str = True) -> Reply:
        fields = dict(fields or {})
        if csrf is True:
            fields["csrf"] = self.csrf or ""
        elif isinstance(csrf, str):
            fields["csrf"] = csrf
        return self.request("POST", path, urlencode(fields).encode(),
                            {"Content-Type": "application/x-www-form-urlencoded"})

    def upload(self, path: str, fields: dict[str, str], name: str, filename: str, data: bytes) -> Reply:
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                 for k, v in {"csrf": self.csrf or "", **fields}.items()]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"'
                     f'\r\nContent-Type: text/csv\r\n\r\n'.encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.request("POST", path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def login_admin(self, email: str = ADMIN, password: str = ADMIN_PASSWORD) -> Reply:
        self.get("/panel/login")
        return self.post("/panel/login", {"email": email, "password": password})

    def login_user(self, email: str = "alice@example.com", password: str | None = None) -> Reply:
        self.get("/login")
        return self.post("/login", {"email": email, "password": password or USERS[email]})


def prepare(config: Config) -> None:
    """Users and one administrator, with cheap hashes, written as the real code would."""
    users = [User(parse_mailbox(email), email.split("@")[0].title(), cheap_hash(password))
             for email, password in USERS.items()]
    users.append(User(parse_mailbox("carol@example.com"), "Carol"))
    config.users_file.write_text("".join(u.line() + "\n" for u in users))
    config.admins_file.parent.mkdir(parents=True, exist_ok=True)
    config.admins_file.write_text(User(parse_mailbox(ADMIN), "", cheap_hash(ADMIN_PASSWORD)).line() + "\n")
