"""SIGHUP to the real `serve` process reloads tls.cert and tls.key: a renewed certificate is
served to the next connection, a broken one is refused with an error line and the old one
stays, and the process never stops for it (issue 8, point 3)."""

from __future__ import annotations

import signal
import smtplib
import ssl

import pytest
import trustme
import yaml

from tests.helpers import free_port, wait_for

try:  # tests/integration as a package ...
    from . import relay_process as rp
except ImportError:  # ... or as a rootdir-less test directory (pytest prepends it to sys.path)
    import relay_process as rp

pytestmark = pytest.mark.timeout(90)


def served_name(address: tuple[str, int], context: ssl.SSLContext) -> str:
    """The common name of the certificate a new STARTTLS connection on port 25 is shown."""
    with smtplib.SMTP(*address, timeout=15) as client:
        client.starttls(context=context)
        subject = dict(pair[0] for pair in client.sock.getpeercert()["subject"])
    return subject["commonName"]


def test_sighup_reloads_the_certificate_and_keeps_the_old_one_when_the_new_is_broken(tmp_path):
    ca = trustme.CA()
    pem = tmp_path / "tls.pem"

    def issue(name: str) -> None:
        ca.issue_cert("127.0.0.1", common_name=name).private_key_and_cert_chain_pem \
            .write_to_path(str(pem))

    issue("first")
    path = rp.write_config(tmp_path, primary_port=free_port())
    config = yaml.safe_load(path.read_text())
    config["tls"] = {"cert": str(pem), "key": str(pem)}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    context = ssl.create_default_context()
    ca.configure_trust(context)

    with rp.RelayProcess(path) as relay:
        assert served_name(relay.address, context) == "first"
        issue("second")
        relay.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "tls.reloaded" in relay.log_text(), 20, "tls.reloaded", relay.log_text)
        assert served_name(relay.address, context) == "second"

        pem.write_text("renewal went wrong\n")
        relay.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "tls.reload_failed" in relay.log_text(), 20, "tls.reload_failed",
                    relay.log_text)
        assert relay.running
        assert served_name(relay.address, context) == "second"
        (line,) = [x for x in relay.log_text().splitlines() if "tls.reload_failed" in x]
        assert " ERROR relay.tls " in line and str(pem) in line
    assert relay.returncode == 0
