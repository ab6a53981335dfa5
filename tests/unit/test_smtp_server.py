"""relay/smtp/server.py's pure parts: enhanced codes added, DSN parameters taken and checked."""

from __future__ import annotations

import pytest

from relay.delivery.dsn import dsn_field, notify_says
from relay.smtp.server import ENHANCED_FOR, check_mail_dsn, check_rcpt_dsn, take_params, with_enhanced_code


@pytest.mark.parametrize("reply, expected", [
    ("503 Error: need RCPT command", "503 5.5.1 Error: need RCPT command"),
    ("552 Error: Too much mail data", "552 5.3.4 Error: Too much mail data"),
    ("250 OK", "250 2.0.0 OK"),
    ("599 odd", "599 5.0.0 odd"),
    ("250 2.1.0 Sender OK", "250 2.1.0 Sender OK"),                   # already has one
    ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),  # 3xx: none
    ("550-first\r\n550 second", "550-5.0.0 first\r\n550 5.0.0 second"),
])
def test_every_line_gets_an_enhanced_code(reply, expected):
    assert with_enhanced_code(reply) == expected


def test_the_added_codes_match_their_class():
    assert all(code[0] == enhanced[0] for code, enhanced in ENHANCED_FOR.items())


def test_dsn_parameters_are_taken_off_with_their_case():
    arg, found = take_params("FROM:<a@b.c> BODY=8BITMIME ret=hdrs ENVID=AbC", ("RET", "ENVID"))
    assert arg == "FROM:<a@b.c> BODY=8BITMIME" and found == {"RET": "hdrs", "ENVID": "AbC"}
    assert check_mail_dsn(found) == ["RET=HDRS", "ENVID=AbC"]
    arg, found = take_params("TO:<x y@b.c> NOTIFY=failure,delay", ("NOTIFY", "ORCPT"))
    assert arg == "TO:<x y@b.c>" and check_rcpt_dsn(found) == ["NOTIFY=FAILURE,DELAY"]
    assert take_params("TO:a@b.c ORCPT=rfc822;a@b.c", ("ORCPT",)) == ("TO:a@b.c", {"ORCPT": "rfc822;a@b.c"})


@pytest.mark.parametrize("params", [{"RET": "ALL"}, {"ENVID": "has space"}, {"ENVID": "x" * 101},
                                    {"ENVID": "a=b"}])
def test_malformed_mail_parameters_are_refused(params):
    with pytest.raises(ValueError):
        check_mail_dsn(params)


@pytest.mark.parametrize("params", [{"NOTIFY": "NEVER,SUCCESS"}, {"NOTIFY": "SOMETIMES"},
                                    {"NOTIFY": "FAILURE,FAILURE"}, {"NOTIFY": ""}, {"ORCPT": "nosemi"},
                                    {"ORCPT": "rfc822;a b"}, {"ORCPT": ";a@b"}])
def test_malformed_rcpt_parameters_are_refused(params):
    with pytest.raises(ValueError):
        check_rcpt_dsn(params)


def test_a_parameter_given_twice_is_refused():
    with pytest.raises(ValueError):
        take_params("FROM:<a@b.c> RET=FULL RET=HDRS", ("RET",))


def test_notify_decides_our_notices():
    assert notify_says((), "FAILURE") and notify_says((), "DELAY") and not notify_says((), "SUCCESS")
    assert not notify_says(("NOTIFY=NEVER",), "FAILURE")
    assert not notify_says(("NOTIFY=SUCCESS",), "FAILURE")
    assert notify_says(("ORCPT=rfc822;a@b", "NOTIFY=SUCCESS,FAILURE"), "FAILURE")
    assert dsn_field(("RET=HDRS", "ENVID=x+2By"), "ENVID") == "x+2By"
    assert dsn_field(("RET=HDRS",), "ENVID") is None


# -- what aiosmtpd builds on every connection, made cheaper ------------------------------------

def _tables_from_full_dir(protocol) -> tuple[set[str], set[str], set[str]]:
    """The command, AUTH and hook names aiosmtpd's __init__ finds with plain dir()."""
    handler = protocol.event_handler
    full = [(name, obj) for obj in (protocol, handler) for name in object.__dir__(obj)]
    commands = {n[5:] for n, obj in full if obj is protocol and n.startswith("smtp_")}
    auth = {getattr(getattr(obj, n), "__auth_mechanism_name__", n[5:].replace("__", "-"))
            for n, obj in full if n.startswith("auth_")}
    hooks = {n[7:] for n, obj in full if obj is handler and n.startswith("handle_")}
    return commands, auth, hooks


def test_the_tables_aiosmtpd_builds_are_those_plain_dir_gives(tmp_path):
    """FewNames (relay/smtp/server.py) makes dir() list only the hook names: aiosmtpd's tables of
    commands, AUTH mechanisms and handler hooks must come out exactly as before."""
    import asyncio

    import trustme

    from relay.smtp import inbound, submission
    from relay.smtp.tls import ServerTLS
    from tests.smtp.helpers import fast_throttle

    pem = tmp_path / "tls.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    tls = ServerTLS(pem, pem)

    async def build() -> list:
        sending = submission.SubmissionHandler("relay.test", None, None, 10, fast_throttle())
        receiving = inbound.InboundHandler({}, "relay.test", None, lambda user: False, None,
                                           submission=sending)
        return [inbound.make_server_factory(receiving, "relay.test", tls, 1024)(),
                inbound.make_server_factory(receiving, "relay.test", None, 1024)(),
                submission.make_server_factory(sending, "relay.test", tls, 1024)()]

    for protocol in asyncio.run(build()):
        commands, auth, hooks = _tables_from_full_dir(protocol)
        assert set(protocol._smtp_methods) == commands and "DATA" in commands
        assert set(protocol._auth_methods) == auth and {"PLAIN", "LOGIN"} <= auth
        assert set(protocol._handle_hooks) == hooks and "RCPT" in hooks


@pytest.mark.parametrize("arg", [
    "<alice@example.com>", "<alice@example.com> SIZE=123 BODY=8BITMIME", "<a.b+c@x.example>",
    "<alice@example.com>   NOTIFY=NEVER ORCPT=rfc822;a@b", "<x@y> (a comment) SIZE=1",
    "<>", " <alice@example.com>", "<alice@example.com>x", "<\"quoted local\"@example.com>",
    "<j\u00fcrgen@example.com> SMTPUTF8", "<@route,@more:alice@example.com>", "<a..b@example.com>",
    "<.a@example.com>", "<alice@[127.0.0.1]>", "alice@example.com", "<alice@example.com> ",
    "<" + "l" * 70 + "@example.com>", "<alice@exam_ple.com>", "<alice@-example.com>",
    "<alice@example.com>\tSIZE=5", "<alice@example.com> SIZE=5 ", "<a@b>(c)",
])
def test_the_fast_address_path_parses_as_aiosmtpd_does(arg):
    """RelaySMTP._getaddr takes `<dot-atom@domain> PARAMS` without the email package: wherever
    it does, the address and the rest must be what aiosmtpd's own parser says."""
    from aiosmtpd.smtp import SMTP

    from relay.smtp.server import RelaySMTP

    class Probe:
        local_part_limit = 64

    assert RelaySMTP._getaddr(Probe(), arg) == SMTP._getaddr(Probe(), arg), arg


def test_the_fast_address_path_agrees_with_aiosmtpd_on_generated_paths():
    from aiosmtpd.smtp import SMTP
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from relay.smtp.server import RelaySMTP

    class Probe:
        local_part_limit = 64

    part = st.text("aZ09.!#+-_=~{}'`|^?&*/@[]\"() \t<>\u00e9", min_size=0, max_size=12)
    rest = st.text("AZ=09;+ ,()\t.", max_size=12)

    @settings(max_examples=400, deadline=None)
    @given(part, part, rest, st.sampled_from(["<{}@{}>{}", "<{}@{}> {}", "{}@{}{}", "<{}@{}>  {}"]))
    def agree(local: str, domain: str, tail: str, shape: str) -> None:
        arg = shape.format(local, domain, tail)
        assert outcome(RelaySMTP._getaddr, arg) == outcome(SMTP._getaddr, arg), arg

    def outcome(parse, arg: str) -> object:
        try:
            return parse(Probe(), arg)
        except (IndexError, AttributeError):   # the email package's own faults: ours says malformed
            return None, None

    agree()
