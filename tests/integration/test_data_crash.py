"""A SIGKILL in the middle of DATA (storage/incoming.py): the half message is only ever in the
incoming spool, which no reader looks at, and the next start removes it."""

from __future__ import annotations

import signal
import smtplib
from pathlib import Path

from tests.helpers import free_port, wait_for

try:  # tests/integration as a package ...
    from . import relay_process as rp
except ImportError:  # ... or as a rootdir-less test directory (pytest prepends it to sys.path)
    import relay_process as rp

USER = f"alice@{rp.DOMAIN}"


def files_under(*roots: Path) -> list[Path]:
    return [path for root in roots if root.exists() for path in root.rglob("*") if path.is_file()]


def test_sigkill_mid_data_leaves_no_half_message_and_start_up_clears_it(tmp_path: Path) -> None:
    cfg = rp.write_config(tmp_path / "relay", primary_port=free_port())   # the primary is down
    rp.import_users(cfg, [USER])
    relay = rp.RelayProcess(cfg)
    relay.start()
    incoming = relay.spool / "incoming"
    client = smtplib.SMTP(*relay.address, local_hostname="client.test", timeout=30)
    try:
        client.ehlo("client.test")
        assert client.mail("s@client.test")[0] == 250
        assert client.rcpt(USER)[0] == 250
        assert client.docmd("DATA")[0] == 354
        line = b"x" * 998 + b"\r\n"
        client.send(b"Subject: half\r\n\r\n" + line * 1000)       # 1 MB, and no end of data
        wait_for(lambda: sum(p.stat().st_size for p in files_under(incoming)) >= 512 * 1024, 30,
                 "the relay to spool the first part of DATA")
        assert relay.kill() == -signal.SIGKILL
    finally:
        client.close()
    assert files_under(incoming), "the half message was in the incoming spool at the kill"
    assert files_under(relay.maildirs, relay.spool / "replay") == []    # and nowhere else
    relay.start()
    try:
        assert files_under(incoming) == []
        assert "inbound.spool_cleared files=1" in relay.log_text()
        with smtplib.SMTP(*relay.address, local_hostname="client.test", timeout=30) as smtp:
            assert smtp.sendmail("s@client.test", [USER], b"Subject: whole\r\n\r\nbody\r\n") == {}
        kept = files_under(relay.maildirs / rp.DOMAIN / "alice" / "new")
        assert [p.read_bytes().endswith(b"\r\n\r\nbody\r\n") for p in kept] == [True]
        wait_for(lambda: files_under(incoming) == [], 10, "the session to remove its file")
    finally:
        relay.stop()
