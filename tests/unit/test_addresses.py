"""Addresses are normalised, and anything that could escape a folder is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.addresses import AddressError, parse_mailbox, parse_sender


def test_normalised_and_path_stays_under_root():
    box = parse_mailbox("<John.Smith+tag@Example.COM>")
    assert str(box) == "john.smith+tag@example.com"
    assert box.path_under(Path("/r")) == Path("/r/example.com/john.smith+tag")


def test_international_domain_becomes_punycode():
    assert parse_mailbox("anna@bücher.example").domain == "xn--bcher-kva.example"


@pytest.mark.parametrize("address", [
    "../x@example.com", "a/b@example.com", "a\\b@example.com", ".x@example.com", "x.@example.com",
    "a..b@example.com", "a\x00b@example.com", "a\nb@example.com", "a\x7fb@example.com", "@example.com",
    "x@", "x", "x@localhost", "x@exa mple.com", "x@../etc", "x@example.com/..", '"q"@example.com',
    "a:b@example.com", "a b@example.com", "y" * 65 + "@example.com", "x@" + "a" * 64 + ".com",
    "x@" + ".".join(["abcdefghi"] * 26) + ".com",
])
def test_unsafe_or_malformed_refused(address):
    with pytest.raises(AddressError):
        parse_mailbox(address)


def test_sender():
    assert parse_sender("<>") == ""
    assert parse_sender("<a@b.example>") == "a@b.example"
    for bad in ("a b@c.example", "a\r\nb@c.example", "nodomain"):
        with pytest.raises(AddressError):
            parse_sender(bad)
