"""A primary that could not be reached (relay/delivery/dead.py): while one connect to it is
under way, and for a second after one failed, other sessions keep their mail at once instead
of each waiting for a connect of their own (a black-holed primary cost every RCPT its
connect_timeout). Then one session tries again, and a primary that answers is used at once."""

from __future__ import annotations

import smtplib
import socket
import threading

from relay.delivery.client import CONNECT, Reply
from relay.delivery.dead import DeadPrimaries
from tests.helpers import wait_for
from tests.smtp.fakes import FakePrimary, stored_files

REFUSED = Reply(451, "connection failed during connect", reached=False, stage=CONNECT)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_after_a_failed_connect_one_session_tries_again_a_second_later_and_an_answer_clears_it():
    clock = Clock()
    dead = DeadPrimaries(retry=1.0, clock=clock)
    assert dead.skip("p") is None and dead.skip("p") is None      # never failed: all connect
    dead.tried("p", REFUSED)
    assert dead.skip("p") is REFUSED                              # within the second
    clock.now += 1.0
    assert dead.skip("p") is None                                 # one session tries
    assert dead.skip("p") is REFUSED                              # the others wait for it
    dead.tried("p", None)                                         # cut off: the next one tries
    assert dead.skip("p") is None
    dead.tried("p", Reply(250, "ok"))                             # it answered: alive
    assert dead.skip("p") is None and dead.skip("p") is None


def test_a_primary_that_answers_with_a_fault_is_not_dead():
    clock = Clock()
    dead = DeadPrimaries(retry=1.0, clock=clock)
    dead.tried("p", REFUSED)
    clock.now += 1.0
    assert dead.skip("p") is None
    dead.tried("p", Reply(421, "closing", reached=False, stage="MAIL"))   # reached at connect
    assert dead.skip("p") is None
    dead.tried("p", Reply(451, "timeout during RCPT", reached=False, stage="RCPT"))
    assert dead.skip("p") is None


class BlackHole:
    """Takes connections and never says a word (a primary whose SMTP server hangs)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        try:
            while True:
                self.accepted.append(self.listener.accept()[0])
        except OSError:
            return

    def close(self) -> None:
        self.listener.close()
        for conn in self.accepted:
            conn.close()


def on_loop(relay, call) -> None:
    """Run `call` on the relay's loop thread (DeadPrimaries belongs to it) and wait for it."""
    done = threading.Event()
    relay.loop.call_soon_threadsafe(lambda: (call(), done.set()))
    assert done.wait(10)


def test_while_one_connect_to_a_silent_primary_waits_other_sessions_keep_their_mail_at_once(make_relay):
    hole = BlackHole()
    relay = make_relay(hole.port, primary="connect_timeout: 60s")
    dead = relay.running.handler.dead
    key = relay.config.domains["example.com"].primary.address

    def failed_before() -> None:          # a connect failed; the next session may try at once
        dead.retry = 0.0
        dead.tried(key, REFUSED)

    on_loop(relay, failed_before)
    first_done = threading.Event()

    def first() -> None:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=90) as client:
            client.sendmail("s@sender.test", ["alice@example.com"], b"Subject: one\r\n\r\nfirst\r\n")
        first_done.set()

    waiting = threading.Thread(target=first, daemon=True)
    waiting.start()
    try:
        wait_for(lambda: len(hole.accepted) == 1, what="the first session's connect to the primary")
        for n in range(3):    # each kept without a connect of its own, while the first waits
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
                assert client.sendmail("s@sender.test", ["bob@example.com"],
                                       f"Subject: {n}\r\n\r\nkept\r\n".encode()) == {}
        assert not first_done.is_set() and len(hole.accepted) == 1
        assert len(stored_files(relay.config.storage.maildirs)) == 3
        on_loop(relay, lambda: setattr(dead, "retry", 3600.0))
    finally:
        hole.close()                 # the first connect fails now: its mail is kept too
    waiting.join(60)
    assert first_done.is_set()
    wait_for(lambda: len(stored_files(relay.config.storage.maildirs)) == 4, what="the first message kept")
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:    # marked dead: kept
        assert client.sendmail("s@sender.test", ["bob@example.com"], b"Subject: 5\r\n\r\nkept\r\n") == {}
    assert len(stored_files(relay.config.storage.maildirs)) == 5


def test_a_kept_connection_whose_reconnect_fails_marks_the_primary_dead(make_relay):
    """The pool's connection to the primary answers 421 to MAIL (the primary shutting down)
    and the new connection tried in its place is refused: that is a failed connect like a fresh
    session's, so the next sessions keep their mail at once instead of each connecting."""
    fake = FakePrimary().start()
    try:
        relay = make_relay(fake.port)
        dead = relay.running.handler.dead
        key = relay.config.domains["example.com"].primary.address
        on_loop(relay, lambda: setattr(dead, "retry", 3600.0))
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:   # passed; kept open
            assert client.sendmail("s@sender.test", ["alice@example.com"], b"Subject: 1\r\n\r\n1\r\n") == {}
        assert len(fake.received) == 1
        stop_listening(fake)              # the kept connection stays; new ones are refused
        fake.script.mail = "421 4.3.2 primary.test shutting down"
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            assert client.sendmail("s@sender.test", ["alice@example.com"], b"Subject: 2\r\n\r\n2\r\n") == {}
        assert len(stored_files(relay.config.storage.maildirs)) == 1       # kept
        marked: list[Reply | None] = []
        on_loop(relay, lambda: marked.append(dead.skip(key)))
        assert marked[0] is not None and marked[0].stage == CONNECT and not marked[0].reached
    finally:
        fake.stop()


def stop_listening(fake: FakePrimary) -> None:
    """Close the fake primary's listening socket, leaving its connections open."""
    done = threading.Event()

    def close() -> None:
        fake.controller.server.close()
        done.set()

    fake.controller.loop.call_soon_threadsafe(close)
    assert done.wait(10)
