"""Every reply string we compose: enhanced status class matches the basic code."""

from __future__ import annotations

import re

import pytest

from relay.smtp import replies


@pytest.mark.parametrize("reply", replies.ALL)
def test_enhanced_code_class_matches_basic_code(reply):
    m = re.match(r"^([245])\d\d ([245])\.\d{1,3}\.\d{1,3} \S", reply)
    assert m, reply
    assert m.group(1) == m.group(2)


def test_every_reply_constant_is_listed():
    names = [n for n in dir(replies) if n.isupper() and n != "ALL"]
    assert sorted(getattr(replies, n) for n in names) == sorted(replies.ALL)


def test_relayed_reply_cannot_inject_lines():
    text = replies.relayed(550, "5.1.1 no\r\n250 fake\nsecond line")
    assert text == "550-5.1.1 no\r\n550-250 fake\r\n550 second line"
    assert replies.relayed(451, "") == "451"
