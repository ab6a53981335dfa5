"""Issue 12.2: the sd_notify protocol (relay/notify.py), against a datagram socket the test
binds itself, as systemd would: a path, an abstract `@` name, none at all; and the watchdog,
which must stop when the event loop is wedged."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from relay.notify import Notifier


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path):
    """A datagram socket as systemd's, and the $NOTIFY_SOCKET value naming it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        name = str(tmp_path / "notify")
        sock.bind(name)
    else:
        name = f"@continuity-relay-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind(b"\0" + name[1:].encode())
    sock.settimeout(10)
    yield sock, name
    sock.close()


def pending(sock: socket.socket) -> list[bytes]:
    """Every datagram queued right now (never waits)."""
    found = []
    sock.setblocking(False)
    try:
        while True:
            found.append(sock.recv(4096))
    except BlockingIOError:
        return found
    finally:
        sock.settimeout(10)


def test_ready_status_stopping_arrive_as_datagrams(listener):
    sock, name = listener
    notifier = Notifier({"NOTIFY_SOCKET": name})
    assert notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("1 domain(s); in outage: none")
    assert sock.recv(4096) == b"READY=1\nSTATUS=1 domain(s); in outage: none"
    notifier.status("1 domain(s); in outage: none")          # unchanged: not sent again
    notifier.status("1 domain(s);\nin outage: example.com")  # one line, whatever it was given
    assert sock.recv(4096) == b"STATUS=1 domain(s); in outage: example.com"
    notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
    notifier.close()


def test_without_notify_socket_everything_is_a_no_op():
    notifier = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("x")
    notifier.stopping()
    asyncio.run(asyncio.wait_for(notifier.watchdog(), 5))     # returns at once


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process_only(tmp_path):
    sock = str(tmp_path / "n")
    assert Notifier({"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    mine = {"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval == 1.0
    theirs = {**mine, "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(theirs).watchdog_interval is None
    assert Notifier({"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "soon"}).watchdog_interval is None


def test_a_socket_nobody_reads_never_raises(tmp_path, caplog):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    notifier.ready("x")
    notifier.status("y")
    notifier.close()
    assert [r.getMessage().split()[0] for r in caplog.records] == ["notify.failed"]   # once


def test_a_wedged_event_loop_stops_the_watchdog_pings(listener):
    """The pings come from the loop: while a callback blocks it (time.sleep standing for a
    blocking call gone wrong), none can be sent, and they start again once it turns. A pinger
    in a thread of its own would have pinged throughout, and systemd would never restart a
    relay whose loop is stuck."""
    sock, name = listener
    notifier = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "40000"})   # a ping every 20 ms
    seen: dict[str, list[bytes]] = {}

    def wedge() -> None:
        pending(sock)                       # what came before
        time.sleep(notifier.watchdog_interval * 10)
        seen["while wedged"] = pending(sock)

    async def scenario() -> None:
        pinger = asyncio.create_task(notifier.watchdog())
        await asyncio.to_thread(sock.recv, 4096)                      # pinging
        asyncio.get_running_loop().call_soon(wedge)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        seen["after"] = [await asyncio.to_thread(sock.recv, 4096)]    # pinging again
        pinger.cancel()
        notifier.close()

    asyncio.run(scenario())
    assert seen["while wedged"] == []
    assert seen["after"] == [b"WATCHDOG=1"]
