"""Property tests for the address parser (security review 9, "Also"): nothing but AddressError
escapes, a parsed address formats and parses back to itself, and nothing that parses can
escape its folder."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from relay.addresses import AddressError, Mailbox, parse_mailbox, parse_sender

ROOT = Path("/srv/maildirs")


@given(st.text(max_size=300))
def test_nothing_but_address_error_escapes(text):
    for parse in (parse_mailbox, parse_sender):
        try:
            parse(text)
        except AddressError:
            pass


@given(st.text(max_size=300))
def test_a_parsed_mailbox_parses_back_to_itself_and_stays_in_its_folder(text):
    try:
        mailbox = parse_mailbox(text)
    except AddressError:
        return
    assert parse_mailbox(str(mailbox)) == mailbox
    assert parse_mailbox(f"<{mailbox}>") == mailbox
    path = mailbox.path_under(ROOT)
    assert path.parent.parent == ROOT and path.resolve().is_relative_to(ROOT)
    assert not any(c in mailbox.local for c in "/\\\0:%") and ".." not in mailbox.local


LOCAL = st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd"), max_codepoint=0x24F),
                min_size=1, max_size=20)
DOMAIN = st.lists(st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=10),
                  min_size=2, max_size=4).map(".".join)


@given(LOCAL, DOMAIN)
def test_well_formed_addresses_are_taken_lower_cased(local, domain):
    mailbox = parse_mailbox(f"{local}@{domain.upper()}")
    assert mailbox == Mailbox(local.lower(), domain)
