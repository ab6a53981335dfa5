from __future__ import annotations

import ssl

import pytest
import trustme

from relay.config import load
from relay.directory import Directory
from tests.helpers import free_port
from tests.smtp.fakes import FakePrimary, InProcessRelay, write_config


@pytest.fixture
def primary():
    server = FakePrimary().start()
    yield server
    server.stop()


@pytest.fixture
def smarthost():
    server = FakePrimary().start()
    yield server
    server.stop()


@pytest.fixture(params=["pipelining", "one at a time"])
def any_primary(request):
    """A primary that offers PIPELINING (the relay's own protocol), and one that does not
    (plain aiosmtpd): the answers must come out the same."""
    server = FakePrimary(dsn=request.param == "pipelining").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def client_tls(ca):
    """A client context that trusts `ca` (and checks the server's name)."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def make_relay(tmp_path):
    """make_relay(primary_port, users=[...], **config) -> a started InProcessRelay."""
    started = []

    def make(primary_port: int | None = None, users=("alice@example.com", "bob@example.com"),
             **options) -> InProcessRelay:
        path = write_config(tmp_path, primary_port or free_port(), **options)
        directory = Directory(load(path))
        for user in users:
            directory.add(user)
        relay = InProcessRelay.from_file(path).start()
        started.append(relay)
        return relay

    yield make
    for relay in started:
        relay.stop()
