"""The webmail in Chromium, the way the issue tells it: an administrator activates a user; the
user logs in, reads the mail kept while the primary server was down, replies with an
attachment, and the reply reaches the smarthost."""

from __future__ import annotations

import email
import email.policy
import re

import pytest
from playwright.sync_api import expect

from tests.browser.helpers import ADMIN, ADMIN_PASSWORD, SENDER, activate_in_panel, text_message
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(60)

BOB, BOB_PASSWORD = "bob@example.com", "bob's new pass 1"
SUBJECT = "Minutes of Tuesday's meeting"
BODY = "Hello Bob,\n\nthe minutes are below. Please send me the signed copy.\n\nCarol"
ATTACHMENT = b"%PDF-1.4\n% a small signed copy\n" + bytes(range(256))


def test_user_reads_mail_kept_during_the_outage_and_replies_with_an_attachment(relay, open_tab, tmp_path):
    relay.cli("admins", "add", ADMIN, "--password-stdin", stdin=ADMIN_PASSWORD + "\n")
    relay.cli("users", "add", BOB, "--name", "Bob Example")
    relay.cli("users", "deactivate", BOB)
    relay.receive(BOB, text_message(SUBJECT, BODY))       # the primary is down: kept for Bob
    assert len(relay.stored(BOB)) == 1
    activate_in_panel(open_tab(), BOB, BOB_PASSWORD)

    tab = open_tab()
    page = tab.page
    tab.goto("/login")
    tab.shot("login")
    tab.log_in_user(BOB, BOB_PASSWORD)
    page.locator("header nav a", has_text="Mail").click()
    page.wait_for_url(relay.url("/mail/INBOX"))
    expect(page.locator("a.folder").first).to_be_visible()
    message = page.locator("a.message", has_text=SUBJECT)
    expect(message).to_have_count(1)
    assert message.evaluate("a => a.closest('.unread') !== null"), "a new message is not shown unread"
    tab.shot("list")

    message.click()
    page.wait_for_url(re.compile(re.escape(relay.url("/mail/INBOX/")) + r".+"))
    expect(page.locator("div.body")).to_contain_text("the minutes are below")
    expect(page.locator("main")).to_contain_text(SUBJECT)
    expect(page.locator("main")).to_contain_text("Carol Remote")
    tab.shot("message")

    page.locator("a.reply").click()
    form = page.locator("form#compose")
    expect(form).to_be_visible()
    assert form.evaluate("f => f.enctype") == "multipart/form-data"
    expect(form.locator("[name=to]")).to_have_value(re.compile(re.escape(SENDER)))
    expect(form.locator("[name=subject]")).to_have_value(re.compile(r"^Re: " + re.escape(SUBJECT)))
    body = form.locator("textarea[name=body]")
    body.fill("Here is the signed copy.\n\n" + body.input_value())
    signed = tmp_path / "signed copy.pdf"
    signed.write_bytes(ATTACHMENT)
    form.locator("input[type=file][name=attachments]").set_input_files(str(signed))
    tab.shot("compose")
    page.locator("button#send").click()
    page.wait_for_url(relay.url("/mail/Sent"))
    expect(page.locator("a.message", has_text=SUBJECT)).to_have_count(1)
    tab.shot("sent")

    wait_for(lambda: relay.smarthost.received)
    (sent,) = relay.smarthost.received
    assert sent.mail_from == BOB and sent.rcpt_tos == [SENDER]
    reply = email.message_from_bytes(sent.content, policy=email.policy.default)
    assert reply["From"].addresses[0].addr_spec == BOB
    assert [a.addr_spec for a in reply["To"].addresses] == [SENDER]
    assert reply["Subject"] == f"Re: {SUBJECT}"
    assert reply["In-Reply-To"] == "<outage-1@remote.test>"
    assert "Bcc" not in reply
    assert "Here is the signed copy." in reply.get_body(("plain",)).get_content()
    (attached,) = list(reply.iter_attachments())
    assert attached.get_filename() == "signed copy.pdf"
    assert attached.get_content() == ATTACHMENT

    # read now: no longer shown unread
    tab.goto("/mail/INBOX")
    message = page.locator("a.message", has_text=SUBJECT)
    assert message.evaluate("a => a.closest('.unread') === null")
    assert tab.dialogs == [] and tab.errors == [] and tab.remote_requests == []
