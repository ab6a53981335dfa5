"""What a hostile message or name cannot do in a real browser, and what a forged form cannot do.

A script in a subject, a sender's name, an HTML body or a user's display name never runs: not
in the page, not in the frame that shows HTML mail (checked with `window.__pwned`, which every
injected script would set, and with dialogs, which every injected `alert` would open), and
nothing is fetched from anywhere but this site. A POST without the session's CSRF token, sent
with the logged-in browser's own cookies, gets 403 and changes nothing.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.browser.helpers import ADMIN, SENDER
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(60)

BOB, BOB_PASSWORD = "bob@example.com", "bob's pass 123"
SCRIPT_SUBJECT = "<script>window.__pwned=1</script>"
SCRIPT_SENDER = "<img src=x onerror=window.__pwned=1>"
HTML_BODY = """\
<html><head>
<base href="http://remote.example.net/">
<meta http-equiv="refresh" content="0;url=http://remote.example.net/refresh">
<link rel="stylesheet" href="http://remote.example.net/style.css">
<style>body { background: url(http://remote.example.net/bg.png) }</style>
<script>window.__pwned = 1; alert("script in head")</script>
</head><body onload="window.__pwned=1; alert('body onload')">
<p>Hello <b>Bob</b>, an ordinary paragraph.</p>
<script>window.__pwned = 1; alert("script in body")</script>
<img src=x onerror="window.__pwned=1; alert('img onerror')">
<img src="http://remote.example.net/track.png?u=bob" alt="tracker">
<a href="javascript:window.__pwned=1;alert('javascript link')">a javascript: link</a>
<a href="JaVaScRiPt:window.__pwned=1">mixed case</a>
<svg onload="window.__pwned=1"><circle r="5"/></svg>
<iframe src="javascript:parent.__pwned=1"></iframe>
<iframe src="http://remote.example.net/frame"></iframe>
<object data="http://remote.example.net/x.swf"></object>
<form action="http://remote.example.net/steal"><input name="q"><button>go</button></form>
<div style="background-image: url('http://remote.example.net/div.png')">styled</div>
</body></html>
"""


def hostile_message() -> bytes:
    boundary = "b0undary"
    return (f'From: "{SCRIPT_SENDER}" <evil@remote.test>\r\nTo: {BOB}\r\nSubject: {SCRIPT_SUBJECT}\r\n'
            "Date: Tue, 03 Mar 2026 10:00:00 +0000\r\nMessage-ID: <xss-1@remote.test>\r\n"
            f'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'
            f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            "Hello Bob, the plain text part <script>window.__pwned=1</script>\r\n"
            f"--{boundary}\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            + HTML_BODY.replace("\n", "\r\n") + f"\r\n--{boundary}--\r\n").encode()


def nothing_ran(tab) -> None:
    tab.page.wait_for_timeout(300)          # an onerror of a failed image load would have fired
    assert set(tab.pwned().values()) == {"undefined"}, tab.pwned()
    assert tab.dialogs == []
    assert tab.errors == []
    assert tab.remote_requests == []


def test_scripts_in_a_subject_a_sender_and_an_html_body_do_not_run(relay, open_tab):
    relay.add_user(BOB, BOB_PASSWORD, "Bob")
    relay.receive(BOB, hostile_message())
    tab = open_tab()
    page = tab.page
    tab.log_in_user(BOB, BOB_PASSWORD)
    tab.goto("/mail/INBOX")
    link = page.locator("a.message")
    expect(link).to_have_count(1)
    expect(link).to_contain_text(SCRIPT_SUBJECT)            # shown as text, not run
    assert page.locator("main script, main [onerror], main [onload]").count() == 0
    tab.shot("list")
    nothing_ran(tab)

    link.click()
    page.wait_for_url(lambda url: url.startswith(relay.url("/mail/INBOX/")))
    expect(page.locator("main")).to_contain_text(SCRIPT_SUBJECT)
    expect(page.locator("main")).to_contain_text(SCRIPT_SENDER)
    frames = page.locator("main iframe")
    expect(frames).to_have_count(1)
    sandbox = frames.get_attribute("sandbox")
    assert sandbox is not None, "HTML mail is not in a sandboxed iframe"
    assert "allow-scripts" not in sandbox.split(), sandbox
    mail = page.frame_locator("main iframe")
    expect(mail.locator("body")).to_contain_text("an ordinary paragraph")
    frame = next(f for f in page.frames if f is not page.main_frame)
    # sanitised as well as sandboxed: nothing that could run or load is left in the mail
    leftovers = frame.evaluate("""() => [...document.body.querySelectorAll(
        'script, iframe, object, embed, form, base, meta, link, style, svg, [onload], [onerror], [src]')]
        .filter(e => !(e.tagName === 'IMG' && e.getAttribute('src').startsWith('data:')))
        .concat([...document.querySelectorAll('[style*="url(" i], [background], body[onload]')])
        .map(e => e.outerHTML.slice(0, 80))
        .concat([...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href'))
                .filter(h => !/^(https?:|mailto:)/i.test(h.trim())))""")
    assert leftovers == [], leftovers
    tab.shot("message")
    nothing_ran(tab)
    message_url = page.url

    page.locator("a.as-text, a:has-text('plain text')").first.click()      # the text part, escaped
    expect(page.locator("div.body")).to_contain_text("<script>window.__pwned=1</script>")
    nothing_ran(tab)
    tab.goto(message_url.removeprefix(relay.base))
    page.locator("a.reply").click()                  # the subject goes into the form as text
    expect(page.locator("form#compose [name=subject]")).to_have_value(f"Re: {SCRIPT_SUBJECT}")
    tab.shot("reply")
    nothing_ran(tab)


def test_a_script_in_a_users_name_does_not_run_in_the_panel(relay, open_tab):
    relay.add_admin()
    name = '<script>window.__pwned=1;alert("name")</script><img src=x onerror="window.__pwned=1">'
    tab = open_tab()
    page = tab.page
    tab.log_in_admin()
    tab.goto("/panel/domains/example.com/add")
    form = page.locator("main form")
    form.locator("input[name=email]").fill("eve")
    form.locator("input[name=name]").fill(name)
    form.locator("input[name=password]").fill("eve's pass 123")
    form.locator("input[name=repeat]").fill("eve's pass 123")
    form.locator("button[type=submit]").click()
    page.wait_for_url(relay.url("/panel/domains/example.com/users/eve?done=added"))
    expect(page.locator("main dd").first).to_have_text(name)
    tab.shot("user")
    nothing_ran(tab)
    tab.goto("/panel/domains/example.com")
    expect(page.locator("main table tr", has_text="eve@example.com")).to_contain_text(name)
    tab.shot("domain")
    nothing_ran(tab)
    assert relay.user("eve@example.com").name == name

    eve = open_tab()                        # and on her own account page
    eve.log_in_user("eve@example.com", "eve's pass 123")
    expect(eve.page.locator("main dl")).to_contain_text(name)
    eve.shot("account")
    nothing_ran(eve)


def test_panel_posts_without_the_csrf_token_are_refused(relay, open_tab):
    relay.add_admin()
    relay.add_user(BOB, BOB_PASSWORD, "Bob")
    users_before = relay.config.users_file.read_bytes()
    audit_before = relay.config.audit_log.read_text() if relay.config.audit_log.exists() else ""
    tab = open_tab()
    page = tab.page
    tab.log_in_admin()
    tab.goto("/panel/domains/example.com/users/bob")
    user_url = relay.url("/panel/domains/example.com/users/bob")
    change = {"password": "taken over 123", "repeat": "taken over 123", "state": "inactive"}

    # with the browser's own cookies, no token / someone else's token
    assert page.request.post(user_url, form=change).status == 403
    assert page.request.post(user_url, form={**change, "csrf": "x" * 43}).status == 403
    assert page.request.post(user_url + "/generate", form={}).status == 403
    upload = {"file": {"name": "u.csv", "mimeType": "text/csv", "buffer": b"email\nmallory@example.com\n"}}
    assert page.request.post(relay.url("/panel/import"), multipart=upload).status == 403
    # a form the page itself submits, as a forging site's script would make it
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.evaluate("""([action, fields]) => {
            const form = document.createElement('form');
            form.method = 'post'; form.action = action;
            for (const [k, v] of Object.entries(fields)) {
                const input = document.createElement('input');
                input.name = k; input.value = v; form.appendChild(input);
            }
            document.body.appendChild(form); form.submit();
        }""", [user_url, change])
    assert posted.value.status == 403
    expect(page.locator("main h1")).to_have_text("Not allowed")
    tab.shot("refused")

    assert relay.config.users_file.read_bytes() == users_before
    audit_after = relay.config.audit_log.read_text()
    assert [line for line in audit_after[len(audit_before):].splitlines()
            if f"admin={ADMIN}" in line and "action=login" not in line] == []
    assert relay.user("mallory@example.com") is None

    # the page's own form, with its token, does change it
    tab.goto("/panel/domains/example.com/users/bob")
    page.locator("main form input[name=state][value=inactive]").check()
    page.locator("main form", has=page.locator("input[name=state]")).locator("button[type=submit]").click()
    page.wait_for_url(user_url + "?done=saved")
    assert not relay.user(BOB).active


def test_sending_without_the_csrf_token_is_refused(relay, open_tab):
    relay.add_user(BOB, BOB_PASSWORD, "Bob")
    tab = open_tab()
    page = tab.page
    tab.log_in_user(BOB, BOB_PASSWORD)
    tab.goto("/mail/compose")
    compose = page.locator("form#compose")
    expect(compose).to_be_visible()
    token = compose.locator("input[name=csrf]").get_attribute("value")
    assert token
    url = relay.url("/mail/compose")
    fields = {"to": SENDER, "cc": "", "bcc": "", "subject": "forged", "body": "sent by someone else"}
    upload = {"name": "x.txt", "mimeType": "text/plain", "buffer": b"forged attachment"}

    assert page.request.post(url, multipart={**fields, "attachments": upload}).status == 403
    assert page.request.post(url, multipart={**fields, "csrf": "x" * 43}).status == 403
    assert page.request.post(url, form=fields).status == 403
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.evaluate("""([action, fields]) => {
            const form = document.createElement('form');
            form.method = 'post'; form.action = action; form.enctype = 'multipart/form-data';
            for (const [k, v] of Object.entries(fields)) {
                const input = document.createElement('input');
                input.name = k; input.value = v; form.appendChild(input);
            }
            document.body.appendChild(form); form.submit();
        }""", [url, fields])
    assert posted.value.status == 403
    expect(page.locator("main h1")).to_have_text("Not allowed")
    tab.shot("refused")
    page.wait_for_timeout(1000)             # the outbound runner is kicked at once on a submit
    assert relay.smarthost.received == []
    assert relay.stored(BOB) == []          # no Sent copy either

    # the same request with the page's token is sent
    sent = page.request.post(url, multipart={**fields, "csrf": token, "subject": "with the token"})
    assert sent.ok and sent.url == relay.url("/mail/Sent"), (sent.status, sent.url)
    wait_for(lambda: relay.smarthost.received)
    assert [r.rcpt_tos for r in relay.smarthost.received] == [[SENDER]]

