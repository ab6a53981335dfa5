"""What the browser tests share: the settings of Debian's Chromium, the relay as the tests see it
(BrowserRelay: its web site, its command line, its users' Maildirs), one browser tab and what
happened in it (Tab), and steps several tests take through the pages.

Screenshots go to `test-artifacts/screenshots/<test>-<page>.png` under the repository root.

The fixtures that make these are in tests/browser/conftest.py."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from playwright.sync_api import BrowserContext, Page, expect

from relay.admins import Admins
from relay.config import Config
from relay.directory import Directory, User
from tests.smtp.fakes import FakePrimary, InProcessRelay, send, stored_files

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
TIMEOUT_MS = 10_000                 # one page action or assertion; a broken page fails fast
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}

ADMIN, ADMIN_PASSWORD = "root@admins.example.net", "admin pass 1"
SENDER = "carol@remote.test"        # who writes to our users from outside

EXTRA_CONFIG = """\
outbound: {{smarthost: {{address: 127.0.0.1:{smarthost}, starttls: off}}, retry_delay: 1s}}
web: {{secret_file: etc/web.secret, session_lifetime: 1h}}
admins_file: etc/admins.passwd
audit_log: log/audit.log
"""


# -- the relay -----------------------------------------------------------------------------------

@dataclass
class BrowserRelay:
    """The whole relay in-process, its primary server down, a fake smarthost, the web on a free port."""

    config_path: Path
    config: Config
    relay: InProcessRelay
    smarthost: FakePrimary

    @property
    def base(self) -> str:
        runner = self.relay.running.web
        assert runner is not None, "listen.web is set, yet the relay started no web server"
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def cli(self, *args: str, stdin: str | None = None) -> str:
        """`continuity-relay ARGS -c config.yaml` as a separate process, as an operator runs it."""
        done = subprocess.run([sys.executable, "-m", "relay", *args, "-c", str(self.config_path)],
                              input=stdin, capture_output=True, text=True, timeout=30,
                              cwd=self.config_path.parent)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    def add_user(self, email: str, password: str | None, name: str = "") -> User:
        """Register a user directly (where the test is not about how users are made)."""
        return Directory(self.config).add(email, name, password)

    def add_admin(self, email: str = ADMIN, password: str = ADMIN_PASSWORD) -> None:
        Admins(self.config).add(email, password)

    def user(self, email: str) -> User | None:
        return Directory(self.config).users().get(email)

    def receive(self, rcpt: str, wire: bytes, mail_from: str = SENDER) -> None:
        """Mail from outside while the primary server is down: accepted, kept in rcpt's INBOX."""
        answers, reply = send(self.relay.port, mail_from, [rcpt], wire)
        assert answers[0][0] == 250, answers
        assert reply is not None and reply[0] == 250, reply

    def maildir(self, email: str) -> Path:
        local, domain = email.split("@")
        return self.config.storage.maildirs / domain / local

    def stored(self, email: str) -> list[Path]:
        return stored_files(self.maildir(email))


# -- the browser ---------------------------------------------------------------------------------

def _remote(url: str) -> bool:
    """A URL that would leave this machine (anything but loopback HTTP, data:, about:, blob:)."""
    parts = urlsplit(url)
    if parts.scheme in ("data", "about", "blob"):
        return False
    return parts.scheme not in ("http", "https") or (parts.hostname or "") not in LOOPBACK


@dataclass
class Tab:
    """One browser (its own context: cookies, storage) with one page, and what happened in it."""

    relay: BrowserRelay
    context: BrowserContext
    page: Page
    test: str
    requests: list[str] = field(default_factory=list)     # every URL the page or its frames asked for
    dialogs: list[str] = field(default_factory=list)      # alert/confirm/prompt: a script ran
    errors: list[str] = field(default_factory=list)       # uncaught script errors
    console: list[str] = field(default_factory=list)      # console errors (e.g. CSP refusals)

    @property
    def remote_requests(self) -> list[str]:
        return [url for url in self.requests if _remote(url)]

    def goto(self, path: str):
        return self.page.goto(self.relay.url(path))

    def shot(self, name: str) -> Path:
        """Save the whole page as test-artifacts/screenshots/<test>-<name>.png."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{self.test}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def log_in(self, path: str, email: str, password: str, lands_on: str) -> None:
        """Fill the login form at `path` and submit it; the browser must land on `lands_on`."""
        self.goto(path)
        form = self.page.locator("main form")
        form.locator("input[name=email]").fill(email)
        form.locator("input[name=password]").fill(password)
        form.locator("button[type=submit]").click()
        self.page.wait_for_url(self.relay.url(lands_on))

    def log_in_admin(self, email: str = ADMIN, password: str = ADMIN_PASSWORD) -> None:
        self.log_in("/panel/login", email, password, "/panel")

    def log_in_user(self, email: str, password: str) -> None:
        self.log_in("/login", email, password, "/account")

    def scroll_width(self) -> int:
        return self.page.evaluate("document.documentElement.scrollWidth")

    def pwned(self) -> dict[str, str]:
        """`typeof window.__pwned` in the page and in every frame (an injected script sets it)."""
        return {f"{i}:{frame.url}": frame.evaluate("typeof window.__pwned")
                for i, frame in enumerate(self.page.frames)}


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


# -- what several tests do -------------------------------------------------------------------------

def activate_in_panel(tab: Tab, email: str, password: str, shots: bool = False) -> None:
    """An administrator logs in, opens the user's domain and the user, allocates `password` and
    sets the user active, through the pages as a person would."""
    page = tab.page
    local, domain = email.split("@")
    tab.goto("/panel/login")
    if shots:
        tab.shot("panel-login")
    tab.log_in_admin()
    if shots:
        tab.shot("panel-domains")
    page.locator("main a", has_text=domain).first.click()
    page.wait_for_url(tab.relay.url(f"/panel/domains/{domain}"))
    expect(page.locator("h1")).to_have_text(domain)
    if shots:
        tab.shot("panel-domain")
    page.locator("main table a", has_text=email).click()
    user_page = tab.relay.url(f"/panel/domains/{domain}/users/{local}")
    page.wait_for_url(user_page)
    if shots:
        tab.shot("panel-user")
    form = page.locator("form", has=page.locator("input[name=repeat]"))
    form.locator("input[name=password]").fill(password)
    form.locator("input[name=repeat]").fill(password)
    form.locator("input[name=state][value=active]").check()
    form.locator("button[type=submit]").click()
    page.wait_for_url(user_page + "?done=saved")
    expect(page.locator("main")).to_contain_text("Saved.")
    if shots:
        tab.shot("panel-user-saved")


def text_message(subject: str, body: str, *, sender: str = f"Carol Remote <{SENDER}>",
                 to: str = "bob@example.com", message_id: str = "<outage-1@remote.test>") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: Tue, 03 Mar 2026 10:00:00 +0000\r\nMessage-ID: {message_id}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n" + body.replace("\n", "\r\n") + "\r\n").encode()
