"""A real Postfix that never sends without TLS (`smtp_tls_security_level = encrypt`) in front
of the relay, with an 8-bit message and a SMTPUTF8 one (issue 8, point 8, first bullet).

Both reach the next hop (a recording aiosmtpd server playing the primary) byte-identical
below the two Received headers (Postfix's, the relay's), with BODY=8BITMIME, and SMTPUTF8 for
the UTF-8 one, in MAIL FROM; the relay's Received header says ESMTPS and UTF8SMTPS (RFC 3848,
RFC 6531 3.7.3): the S is the relay's own word that the session was over TLS, and Postfix's
log says the same from its side. The fixtures and helpers are test_postfix_interop.py's."""

from __future__ import annotations

import re
import smtplib

import pytest

try:  # tests/integration as a package ...
    from . import relay_process as rp
    from .postfix import Postfix, strip_trace
    from .test_postfix_interop import (  # noqa: F401 (fixtures, by name)
        ALICE,
        SENDER,
        WAIT,
        explainer,
        message,
        recorder,
        relay_config,
        relay_tls,
    )
except ImportError:  # ... or as a rootdir-less test directory (pytest prepends it to sys.path)
    import relay_process as rp
    from postfix import Postfix, strip_trace
    from test_postfix_interop import (  # noqa: F401 (fixtures, by name)
        ALICE,
        SENDER,
        WAIT,
        explainer,
        message,
        recorder,
        relay_config,
        relay_tls,
    )

from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(60)

UTF8_SENDER, UTF8_RCPT = "j\u00f6s\u00e9@example.org", f"zo\u00eb@{rp.DOMAIN}"


def relay_protocol(content: bytes) -> str:
    """The `with` word of the first Received header, the relay's (Postfix's comes below it)."""
    found = re.match(rb"Received: from [^\r]*\r\n\tby \S+ \(continuity-relay\) with (\S+) id ",
                     content)
    assert found, content[:300]
    return found.group(1).decode()


def number(content: bytes) -> int:
    return int(content.split(b"Message-ID: <interop-")[1].split(b"@")[0])


def test_postfix_requiring_tls_relays_8bit_and_smtputf8_intact(
        mail_tmp_path, postfix_factory, recorder, relay_tls):
    ca_file, tls = relay_tls
    primary_port, primary = recorder()
    cfg = relay_config(mail_tmp_path / "relay", primary_port, [ALICE], extra={"tls": tls})
    with rp.RelayProcess(cfg) as relay:
        mta = postfix_factory(Postfix.sender(mail_tmp_path / "sender", relay_port=relay.port,
                                             tls_level="encrypt", ca_file=ca_file)).start()
        explain = explainer(relay, mta)
        sent = {5: message(5), 6: message(6, to=UTF8_RCPT, sender=UTF8_SENDER)}
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=15) as client:
            client.ehlo("client.test")
            assert client.sendmail(SENDER, [ALICE], sent[5], ["BODY=8BITMIME"]) == {}
            assert client.sendmail(UTF8_SENDER, [UTF8_RCPT], sent[6],
                                   ["SMTPUTF8", "BODY=8BITMIME"]) == {}
        wait_for(lambda: len(primary.got) == 2 or "status=deferred" in mta.log_text(), WAIT,
                 "both messages at the primary, or Postfix deferring one", explain)
        assert len(primary.got) == 2, f"Postfix deferred a message:\n{explain()}"
        mta.wait_queue_empty(WAIT, explain)
        log = mta.log_text()

    by_number = {number(got.content): got for got in primary.got}
    assert sorted(by_number) == [5, 6], primary.got
    plain, utf8 = by_number[5], by_number[6]
    assert (plain.mail_from, plain.rcpt_tos) == (SENDER, [ALICE])
    assert (utf8.mail_from, utf8.rcpt_tos) == (UTF8_SENDER, [UTF8_RCPT])
    for got, options, word in ((plain, {"BODY=8BITMIME"}, "ESMTPS"),
                               (utf8, {"BODY=8BITMIME", "SMTPUTF8"}, "UTF8SMTPS")):
        assert options <= {o.upper() for o in got.mail_options}, got.mail_options
        assert relay_protocol(got.content) == word, got.content[:300]
        # The relay's Received header, then Postfix's, then the bytes as sent.
        assert strip_trace(got.content) == ([b"received", b"received"], sent[number(got.content)])
    assert "SMTPUTF8" not in {o.upper() for o in plain.mail_options}   # asked for by no one
    assert "TLS connection established to 127.0.0.1" in log, log
    assert "Trusted TLS connection" in log, log   # the relay's chain verifies with ca_file
    assert log.count(f"relay=127.0.0.1[127.0.0.1]:{relay.port}") == 2, log
    assert log.count("status=sent") == 2, log
