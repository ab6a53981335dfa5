"""On a phone-sized screen (375 x 667) the main pages fit: no sideways scrolling of the page, even
with a long subject, a long address and a long unbroken line in the mail."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.browser.helpers import text_message

pytestmark = pytest.mark.timeout(60)

WIDTH = 375
PHONE = {"viewport": {"width": WIDTH, "height": 667}, "device_scale_factor": 2, "is_mobile": True,
         "has_touch": True}
BOB, BOB_PASSWORD = "bob@example.com", "bob's pass 123"
SUBJECT = "Quarterly figures: " + "Supercalifragilisticexpialidocious-" * 3 + "report"
LINK = "https://intranet.remote.test/documents/" + "a1b2c3d4e5" * 15
BODY = f"Hello Bob,\n\nthe figures are here:\n{LINK}\n\n" + "A normal sentence that wraps. " * 20
HTML_MAIL = ("From: Newsletter <news@remote.test>\r\nTo: bob@example.com\r\nSubject: Wide newsletter\r\n"
             "Date: Tue, 03 Mar 2026 09:00:00 +0000\r\nMessage-ID: <wide-1@remote.test>\r\n"
             "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
             '<table width="900"><tr><td>A table laid out for a desktop screen</td><td>second column'
             f"</td></tr></table><p>{'x' * 300}</p>\r\n").encode()


def fits(tab, page_name: str) -> None:
    tab.shot(page_name)
    width = tab.scroll_width()
    assert width <= WIDTH, f"{page_name}: the page is {width} px wide on a {WIDTH} px screen"


def test_webmail_pages_fit_a_phone(relay, open_tab):
    relay.add_user(BOB, BOB_PASSWORD, "Bob")
    relay.receive(BOB, text_message(SUBJECT, BODY,
                                    sender="Carol Remote-Longname <carol.remote-longname@remote.test>"))
    relay.receive(BOB, HTML_MAIL)
    tab = open_tab(**PHONE)
    page = tab.page
    tab.goto("/login")
    fits(tab, "login")
    tab.log_in_user(BOB, BOB_PASSWORD)
    fits(tab, "account")
    tab.goto("/mail")
    page.wait_for_url(relay.url("/mail/INBOX"))
    expect(page.locator("a.message")).to_have_count(2)
    fits(tab, "list")
    page.locator("a.message", has_text="Quarterly figures").click()
    page.wait_for_url(re.compile(re.escape(relay.url("/mail/INBOX/")) + ".+"))
    expect(page.locator("div.body")).to_contain_text("the figures are here")
    fits(tab, "message")
    page.locator("a.reply").click()
    expect(page.locator("form#compose")).to_be_visible()
    fits(tab, "compose")
    # HTML mail laid out for a wide screen scrolls inside its frame, not the page
    tab.goto("/mail/INBOX")
    page.locator("a.message", has_text="Wide newsletter").click()
    expect(page.frame_locator("iframe").locator("body")).to_contain_text("laid out for a desktop")
    box = page.locator("iframe").bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= WIDTH, box
    fits(tab, "message-html")


def test_panel_pages_fit_a_phone(relay, open_tab):
    relay.add_admin()
    relay.add_user(BOB, None, "Bob " + "Longname" * 8)
    tab = open_tab(**PHONE)
    tab.goto("/panel/login")
    fits(tab, "panel-login")
    tab.log_in_admin()
    fits(tab, "panel-domains")
    tab.goto("/panel/domains/example.com")
    fits(tab, "panel-domain")
    tab.goto("/panel/domains/example.com/users/bob")
    fits(tab, "panel-user")
