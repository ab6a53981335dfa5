"""The web pages in a real headless Chromium (Debian's `chromium`, driven by Playwright's Python
package), against the whole relay running in-process: inbound SMTP with its primary server
down (mail is kept in the users' Maildirs), outbound to a scripted smarthost, and the web site.

Playwright's sync API runs in the test's own thread; the relay runs its asyncio loop in a
background thread (tests/smtp/fakes.InProcessRelay), so the two never share a loop.

Screenshots go to `test-artifacts/screenshots/<test>-<page>.png` under the repository root.

The fixtures are here; what they make and what the tests share is in tests/browser/helpers.py.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Playwright, expect, sync_playwright

from relay.config import HostPort, load
from tests.browser.helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    EXTRA_CONFIG,
    TIMEOUT_MS,
    BrowserRelay,
    Tab,
    safe_name,
)
from tests.helpers import free_port
from tests.smtp.fakes import FakePrimary, InProcessRelay, write_config

# -- the relay -----------------------------------------------------------------------------------

@pytest.fixture
def relay(tmp_path) -> Iterator[BrowserRelay]:
    smarthost = FakePrimary().start()
    # primary: a free port nothing listens on, so every domain's primary server is down
    path = write_config(tmp_path, free_port(), extra=EXTRA_CONFIG.format(smarthost=smarthost.port))
    config = load(path)
    config = dataclasses.replace(config, listen=dataclasses.replace(config.listen,
                                                                    web=HostPort("127.0.0.1", 0)))
    running = InProcessRelay(config)
    try:
        running.start()
        yield BrowserRelay(path, running.config, running, smarthost)
    finally:
        if running.running is not None:
            running.stop()
        smarthost.stop()


# -- the browser ---------------------------------------------------------------------------------

@pytest.fixture(scope="package")
def playwright_driver() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="package")
def chromium(playwright_driver) -> Iterator[Browser]:
    """Debian's Chromium; never a downloaded one, and never skipped: missing, every test fails."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package "
                    "(apt-get install chromium; scripts/test does it)", pytrace=False)
    browser = playwright_driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                         headless=True, timeout=30_000)
    expect.set_options(timeout=TIMEOUT_MS)
    yield browser
    browser.close()


@pytest.fixture
def open_tab(chromium, relay, request) -> Iterator[Callable[..., Tab]]:
    """open_tab(**context options, e.g. viewport=...) -> a Tab on the relay's web site."""
    contexts: list[BrowserContext] = []

    def open_(**options) -> Tab:
        context = chromium.new_context(**options)
        contexts.append(context)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        tab = Tab(relay, context, page, safe_name(request.node.name))
        context.on("request", lambda r: tab.requests.append(r.url))
        page.on("dialog", lambda d: (tab.dialogs.append(f"{d.type}: {d.message}"), d.dismiss()))
        page.on("pageerror", lambda e: tab.errors.append(str(e)))
        page.on("console", lambda m: tab.console.append(m.text) if m.type == "error" else None)
        return tab

    yield open_
    for context in contexts:
        context.close()
