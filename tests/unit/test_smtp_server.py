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
