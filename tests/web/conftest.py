"""Fixtures for the web tests: the web server on a free port (tests/web/helpers.WebServer), with
fresh users and an administrator, and clients for it (tests/web/helpers.Client)."""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from relay.auth import LoginThrottle
from relay.config import Config, HostPort, load
from relay.smtp.tls import tls_context
from tests.helpers import free_port
from tests.smtp.fakes import write_config
from tests.web.helpers import WEB_CONFIG, Client, Clock, WebServer, prepare, watching_the_loop


@pytest.fixture
def config_path(tmp_path) -> Path:
    return write_config(tmp_path, free_port(), extra=f"  example.org:\n    primary: 127.0.0.1:{free_port()}\n"
                        + WEB_CONFIG)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_server(config_path, clock):
    """make_server(throttle=..., ssl_context=..., keep_files=..., adjust=..., **web settings) -> a
    started WebServer on 127.0.0.1, port 0, with fresh users and administrator unless `keep_files`;
    `adjust(config)` may change the loaded configuration first."""
    started: list[WebServer] = []

    def make(throttle: LoginThrottle | None = None, ssl_context: ssl.SSLContext | None = None,
             keep_files: bool = False, adjust: Callable[[Config], Config] | None = None,
             **web_options) -> WebServer:
        config = load(config_path)
        if adjust is not None:
            config = adjust(config)
        config = dataclasses.replace(config, listen=dataclasses.replace(config.listen,
                                                                        web=HostPort("127.0.0.1", 0)))
        if web_options:
            config = dataclasses.replace(config, web=dataclasses.replace(config.web, **web_options))
        if not keep_files:
            prepare(config)
        server = WebServer(config, throttle or LoginThrottle(base_delay=0.0, max_delay=0.0), clock,
                           ssl_context).start()
        started.append(server)
        return server

    with watching_the_loop(started):
        yield make


@pytest.fixture
def server(make_server) -> WebServer:
    return make_server()


@pytest.fixture
def client(server) -> Client:
    return Client(server.port)


@pytest.fixture
def admin(server) -> Client:
    browser = Client(server.port)
    assert browser.login_admin().status == 303
    assert browser.get("/panel").status == 200      # a page of the new session: its CSRF token
    return browser


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_files(ca, tmp_path_factory) -> tuple[Path, Path]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    folder = tmp_path_factory.mktemp("tls")
    cert.cert_chain_pems[0].write_to_path(folder / "cert.pem")
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(folder / "cert.pem", append=True)
    cert.private_key_pem.write_to_path(folder / "key.pem")
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture
def server_tls(tls_files) -> ssl.SSLContext:
    return tls_context(*tls_files)


@pytest.fixture
def client_tls(ca) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context
