"""The web server inside `continuity-relay serve`: started by app.start() on listen.web, stopped
by Running.close(); a port that cannot be bound is a RelayError naming listen.web."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket

import pytest

from relay.config import TLS, HostPort, load
from relay.errors import RelayError
from tests.smtp.fakes import InProcessRelay
from tests.web.helpers import Client, prepare

pytestmark = pytest.mark.timeout(60)


def with_web(config, port: int = 0, **web_options):
    listen = dataclasses.replace(config.listen, web=HostPort("127.0.0.1", port))
    return dataclasses.replace(config, listen=listen, web=dataclasses.replace(config.web, **web_options))


def test_serve_runs_the_web_server_and_close_stops_it(config_path, caplog):
    caplog.set_level(logging.INFO, logger="relay")
    config = with_web(load(config_path))
    prepare(config)
    relay = InProcessRelay(config).start()
    try:
        port = relay.running.web.addresses[0][1]
        admin = Client(port)
        assert admin.login_admin().status == 303
        assert "example.com" in admin.get("/panel").text
        assert any(r.getMessage() == f"web.listening address=127.0.0.1:{port} tls=no" for r in caplog.records)
    finally:
        relay.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_serve_over_tls(config_path, tls_files, client_tls):
    cert, key = tls_files
    config = dataclasses.replace(with_web(load(config_path), tls=True), tls=TLS(cert, key))
    prepare(config)
    relay = InProcessRelay(config).start()
    try:
        browser = Client(relay.running.web.addresses[0][1], tls=client_tls)
        assert browser.login_admin().status == 303
        assert list(browser.cookies) == ["__Host-relay_session"]
        assert browser.get("/panel").status == 200
    finally:
        relay.stop()


def test_no_listen_web_no_web_server(config_path):
    relay = InProcessRelay(load(config_path)).start()
    try:
        assert relay.running.web is None
    finally:
        relay.stop()


def test_a_port_in_use_is_a_relay_error_naming_listen_web(config_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = with_web(load(config_path), taken.getsockname()[1])

        async def start():
            from relay.admins import Admins
            from relay.directory import Directory
            from relay.web import start_web
            return await start_web(config, Directory(config), Admins(config))

        with pytest.raises(RelayError, match=r"^listen.web 127.0.0.1:\d+: Address already in use$"):
            asyncio.run(start())


def test_no_admins_is_logged_with_the_command_to_add_one(config_path, caplog):
    caplog.set_level(logging.INFO, logger="relay")
    config = with_web(load(config_path))
    relay = InProcessRelay(config).start()
    try:
        assert any(r.getMessage().startswith("web.no_admins hint=") for r in caplog.records)
    finally:
        relay.stop()
