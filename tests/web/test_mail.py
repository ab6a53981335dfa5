"""The webmail (issue 5): folders, paging, read state in Maildir file names, plain and sanitised
HTML bodies, attachment downloads, composing through the real Submitter (outbound queue, Sent copy,
"(CS-SENT)" replay), replies and forwards, delete and move, and who may see what."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import html
import re
import uuid
from pathlib import Path
from urllib.parse import unquote

import pytest

from relay.addresses import parse_mailbox
from relay.app import _submit_and_kick
from relay.auth import LoginThrottle
from relay.config import HostPort, load
from relay.delivery.submit import Submitter
from relay.errors import PermFail
from relay.storage.continuity import ContinuityStore
from relay.storage.maildir import MaildirStore
from relay.web import start_web
from relay.web.mail import FRAME_POLICY, SENDING_DISABLED
from tests.loopwatch import watch_thread
from tests.smtp.fakes import FakePrimary, InProcessRelay
from tests.web.helpers import Client, Reply, WebServer, prepare, watching_the_loop

pytestmark = pytest.mark.timeout(60)

ALICE, BOB = parse_mailbox("alice@example.com"), parse_mailbox("bob@example.com")
EVIL = '<script>alert("x")</script>'


# -- a web server with the webmail, and messages in Maildirs ---------------------------------------

class Kicks:
    """Stands in for the OutboundRunner: counts the kicks the submit pipeline gives it."""

    def __init__(self) -> None:
        self.count = 0

    def kick(self) -> None:
        self.count += 1


class MailServer(WebServer):
    """`start_web` with the webmail's Maildir store and a submit pipeline (None: sending off)."""

    def __init__(self, config, clock, submit=None, sending: bool = True) -> None:
        super().__init__(config, LoginThrottle(base_delay=0.0, max_delay=0.0), clock)
        self.maildirs = MaildirStore(config.storage.maildirs)
        self.store = ContinuityStore(self.maildirs, config.storage.spool)
        self.kicks = Kicks()
        if submit is None and sending:
            submit = _submit_and_kick(Submitter(self.store, config.max_recipients,
                                             config.message_size_limit), self.kicks)
        self.submit = submit

    def start(self) -> MailServer:
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(start_web(
            self.config, self.directory, self.admins, self.throttle, clock=self.clock,
            maildirs=self.maildirs, submit=self.submit), self.loop).result(10)
        watch_thread(self.thread)       # requests on, start-up (one-off) not
        return self

    def box(self, user=ALICE) -> Path:
        return self.maildirs.ensure(user)

    def put(self, data: bytes, folder: str = "", when: int = 1_800_000_000, seen: bool = False,
            user=ALICE) -> str:
        """A message file with a chosen time (the list's order); returns its key."""
        box = self.box(user) / (f".{folder}" if folder else "")
        if folder:
            make_folder(self.box(user), folder)
        key = f"{when}.M0P1Q{uuid.uuid4().hex[:8]}.host,S={len(data)}"
        path = box / ("cur" if seen else "new") / (f"{key}:2,S" if seen else key)
        path.write_bytes(data)
        return key

    def files(self, folder: str = "", user=ALICE) -> list[str]:
        box = self.box(user) / (f".{folder}" if folder else "")
        return sorted(p.name for sub in ("new", "cur") if (box / sub).is_dir() for p in (box / sub).iterdir())


def make_folder(box: Path, name: str) -> None:
    for sub in ("cur", "new", "tmp"):
        (box / f".{name}" / sub).mkdir(parents=True, exist_ok=True)
    (box / f".{name}" / "maildirfolder").touch()


@pytest.fixture
def make_mail(config_path, clock):
    started: list[MailServer] = []

    def make(**options) -> MailServer:
        config = load(config_path)
        config = dataclasses.replace(config, listen=dataclasses.replace(config.listen,
                                                                        web=HostPort("127.0.0.1", 0)))
        prepare(config)
        server = MailServer(config, clock, **options).start()
        started.append(server)
        return server

    with watching_the_loop(started):
        yield make


@pytest.fixture
def mail(make_mail) -> MailServer:
    return make_mail()


def logged_in(server: WebServer | int, email_address: str = "alice@example.com") -> Client:
    browser = Client(server if isinstance(server, int) else server.port)
    assert browser.login_user(email_address).status == 303
    assert browser.get("/account").status == 200        # a page of the new session: its CSRF token
    return browser


@pytest.fixture
def alice(mail) -> Client:
    return logged_in(mail)


def message(subject: str = "hello", body: str = "hi there\r\n", sender: str = "Bob <bob@example.org>",
            extra: str = "") -> bytes:
    return (f"Return-Path: <bob@example.org>\r\nDelivered-To: alice@example.com\r\n"
            f"From: {sender}\r\nTo: Alice <alice@example.com>\r\n{extra}Subject: {subject}\r\n"
            f"Date: Tue, 01 Dec 2026 10:00:00 +0100\r\nMessage-ID: <{uuid.uuid4().hex}@example.org>\r\n"
            f"\r\n{body}").encode()


def links(page: Reply, css_class: str) -> list[tuple[str, str]]:
    """(href, text) of every <a> whose class list holds `css_class`."""
    found = []
    for attrs, text in re.findall(r"<a ([^>]*)>(.*?)</a>", page.body, re.S):
        classes = re.search(r'class="([^"]*)"', attrs)
        if classes and css_class in classes.group(1).split():
            found.append((re.search(r'href="([^"]*)"', attrs).group(1), re.sub(r"<[^>]+>", "", text).strip()))
    return found


def field_value(page: Reply, name: str) -> str | None:
    found = re.search(rf'<input[^>]*name="{name}"[^>]*value="([^"]*)"', page.body)
    return html.unescape(found.group(1)) if found else None


def textarea(page: Reply) -> str:
    """The body field's text (the page puts a newline after <textarea>, which HTML drops)."""
    found = re.search(r'<textarea name="body"[^>]*>\n(.*?)</textarea>', page.body, re.S)
    return html.unescape(found.group(1))


def post_form(browser: Client, path: str, fields: list[tuple[str, str]],
              files: list[tuple[str, str, str, bytes]] = (), csrf: bool = True) -> Reply:
    """A multipart/form-data POST as a browser sends the compose form."""
    boundary = uuid.uuid4().hex
    body = b""
    for name, value in [("csrf", browser.csrf or "")] * csrf + list(fields):
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n').encode() \
            + value.encode() + b"\r\n"
    for name, filename, content_type, data in files:
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                 f"Content-Type: {content_type}\r\n\r\n").encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return browser.request("POST", path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def compose_fields(**values: str) -> list[tuple[str, str]]:
    base = {"to": "", "cc": "", "bcc": "", "subject": "", "body": "", "in_reply_to": "", "references": ""}
    return list({**base, **values}.items())


# -- folders and the message list -------------------------------------------------------------------

def test_mail_goes_to_the_inbox_and_every_folder_is_listed(mail, alice):
    make_folder(mail.box(), "Archive")
    make_folder(mail.box(), "Entw&APw-rfe")
    reply = alice.get("/mail")
    assert reply.status == 303 and reply.location == "/mail/INBOX"
    page = alice.get("/mail/INBOX")
    assert page.status == 200
    assert links(page, "folder") == [("/mail/INBOX", "INBOX"), ("/mail/Sent", "Sent"),
                                     ("/mail/Outbox", "Outbox"), ("/mail/Archive", "Archive"),
                                     ("/mail/Entw%26APw-rfe", "Entwürfe")]
    assert "No messages in INBOX" in page.text
    assert alice.get("/mail/Entw%26APw-rfe").status == 200
    assert alice.get("/mail/inbox").status == 200            # IMAP's INBOX is case-insensitive


@pytest.mark.parametrize("name", ["archive", "compose", "folder"])
def test_a_folder_named_like_one_of_our_pages_is_reachable(mail, alice, name):
    """/mail/archive and /mail/compose are the archive and compose pages: a user's folder of
    that name has its pages under /mail/folder/<name>; other folders keep /mail/<name>."""
    key = mail.put(message(f"in {name}"), folder=name)
    listed = dict(links(alice.get("/mail/INBOX"), "folder"))
    assert listed[f"/mail/folder/{name}"] == name and ("/mail/Sent", "Sent") in listed.items()
    page = alice.get(f"/mail/folder/{name}")
    assert page.status == 200
    ((href, subject),) = links(page, "message")
    assert (unquote(href), subject) == (f"/mail/folder/{name}/{key}", f"in {name}")
    assert f"in {name}" in alice.get(href).text
    assert alice.post(f"{href}/delete").location == f"/mail/folder/{name}"
    assert mail.files(name) == [] and len(mail.files("Trash")) == 1
    assert 'id="compose"' in alice.get("/mail/compose").body        # the pages stay theirs
    assert alice.get("/mail/archive").status == 200


def test_the_list_pages_newest_first_with_unread_marked(mail, alice):
    keys = [mail.put(message(f"message {n}"), when=1_800_000_000 + n, seen=n % 2 == 0) for n in range(60)]
    page = alice.get("/mail/INBOX")
    shown = links(page, "message")
    assert [text for _, text in shown] == [f"message {n}" for n in range(59, 34, -1)]
    assert shown[0][0] == f"/mail/INBOX/{keys[59].replace(',', '%2C').replace('=', '%3D')}"
    unread = [text for _, text in links(page, "unread")]
    assert unread == [f"message {n}" for n in range(59, 34, -2)]
    assert len(re.findall(r'<li class="unread', page.body)) == len(unread)
    assert links(page, "next-page") == [("/mail/INBOX?page=2", "Older")]
    assert links(page, "prev-page") == []
    assert "1–25 of 60" in page.text
    page2 = alice.get("/mail/INBOX?page=2")
    assert [t for _, t in links(page2, "message")][0] == "message 34"
    assert links(page2, "prev-page") == [("/mail/INBOX", "Newer")]
    assert links(page2, "next-page") == [("/mail/INBOX?page=3", "Older")]
    page3 = alice.get("/mail/INBOX?page=3")
    assert [t for _, t in links(page3, "message")] == [f"message {n}" for n in range(9, -1, -1)]
    assert links(page3, "next-page") == [] and links(page3, "prev-page") == [("/mail/INBOX?page=2", "Newer")]
    assert [t for _, t in links(alice.get("/mail/INBOX?page=99"), "message")][-1] == "message 0"
    assert [t for _, t in links(alice.get("/mail/INBOX?page=x"), "message")][0] == "message 59"


def test_sent_folders_list_recipients(mail, alice):
    mail.put(message("to carol", sender="Alice <alice@example.com>").replace(
        b"To: Alice <alice@example.com>", b"To: Carol <carol@example.net>"), folder="Sent", seen=True)
    page = alice.get("/mail/Sent")
    assert [t for _, t in links(page, "message")] == ["to carol"]
    assert '<span class="party">Carol</span>' in page.body             # the name, not the address


# -- reading ------------------------------------------------------------------------------------------

def test_reading_a_message_marks_it_seen_in_the_file_name(mail, alice):
    key = mail.put(message("new one"))
    assert mail.files() == [key]
    (url, _), = links(alice.get("/mail/INBOX"), "message")
    page = alice.get(url)
    assert page.status == 200 and "new one" in page.text
    assert mail.files() == [f"{key}:2,S"]
    assert (mail.box() / "cur" / f"{key}:2,S").is_file()
    assert links(alice.get("/mail/INBOX"), "unread") == []
    assert alice.post(url + "/unread").location == "/mail/INBOX"
    assert mail.files() == [f"{key}:2,"]
    assert "Marked as unread" in alice.get("/mail/INBOX").text
    assert "Marked as unread" not in alice.get("/mail/INBOX").text      # said once


def test_plain_text_is_escaped_in_a_pre_and_scripts_never_run(mail, alice):
    key = mail.put(message(EVIL, body=f"line one\r\n{EVIL}\r\n<b>bold?</b>\r\n",
                           sender=f'"{EVIL}" <x@y.test>'))
    for path in ("/mail/INBOX", f"/mail/INBOX/{key}", f"/mail/INBOX/{key}/reply",
                 f"/mail/INBOX/{key}/forward"):
        page = alice.get(path)
        assert page.status == 200, path
        assert "<script" not in page.body and "<b>bold" not in page.body, path
    page = alice.get(f"/mail/INBOX/{key}")
    assert re.search(r'<div class="body">\s*<pre>line one\n&lt;script&gt;alert\(&#34;x&#34;\)'
                     r"&lt;/script&gt;\n&lt;b&gt;bold\?&lt;/b&gt;", page.body)
    assert "<iframe" not in page.body
    assert "<title>&lt;script&gt;" in page.body


HTML_MAIL = (b"From: news@other.test\r\nTo: alice@example.com\r\nSubject: html\r\nMIME-Version: 1.0\r\n"
             b'Content-Type: multipart/alternative; boundary="B"\r\n\r\n'
             b"--B\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nthe text version\r\n"
             b"--B\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
             b"<html><head><script>alert(1)</script><style>p{}</style></head><body onload=\"x()\">"
             b'<p>Hello <b>world</b></p><img src="http://evil.test/track.png" alt="t">'
             b'<img src="data:image/png;base64,iVBORw0K" alt="inline"><a href="https://good.test/">link</a>'
             b"</body></html>\r\n--B--\r\n")


def test_html_is_sanitised_and_shown_only_in_a_sandboxed_frame(mail, alice):
    key = mail.put(HTML_MAIL)
    page = alice.get(f"/mail/INBOX/{key}")
    assert "<script" not in page.body and "evil.test" not in page.body
    frame = re.search(r'<div class="body">\s*<iframe ([^>]*)>', page.body).group(1)
    assert 'sandbox="allow-popups allow-popups-to-escape-sandbox"' in frame
    assert f'src="/mail/INBOX/{key.replace(",", "%2C").replace("=", "%3D")}/html"' in frame
    assert "allow-scripts" not in frame and "allow-same-origin" not in frame
    html = alice.get(f"/mail/INBOX/{key}/html")
    assert html.status == 200 and html.header("Content-Type").startswith("text/html")
    assert html.header("Content-Security-Policy") == FRAME_POLICY
    assert html.header("X-Frame-Options") == "SAMEORIGIN"
    assert "<p>Hello <b>world</b></p>" in html.body
    assert "<script" not in html.body and "alert" not in html.body and "onload" not in html.body
    assert "evil.test" not in html.body and 'src="data:image/png;base64,iVBORw0K"' in html.body
    assert 'rel="noopener noreferrer"' in html.body
    as_text = alice.get(f"/mail/INBOX/{key}?view=text")
    assert "<pre>the text version" in as_text.body and "<iframe" not in as_text.body
    plain = mail.put(message("plain"))
    assert alice.get(f"/mail/INBOX/{plain}/html").status == 404


def test_html_only_mail_without_a_text_part(mail, alice):
    key = mail.put(b"From: a@b.test\r\nSubject: only html\r\nContent-Type: text/html\r\n\r\n"
                   b"<p>only <i>html</i></p><script>bad()</script>\r\n")
    page = alice.get(f"/mail/INBOX/{key}")
    assert "<iframe" in page.body
    assert "<pre>only html" in alice.get(f"/mail/INBOX/{key}?view=text").body


def attachment_mail(*parts: tuple[str, bytes]) -> bytes:
    body = b"".join(b"--B\r\n" + head.encode() + b"\r\n\r\n" + data + b"\r\n" for head, data in parts)
    return (b"From: bob@example.org\r\nTo: alice@example.com\r\nSubject: files\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n'
            b"--B\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n" + body + b"--B--\r\n")


def test_attachments_download_with_safe_names_and_headers(mail, alice):
    key = mail.put(attachment_mail(
        ('Content-Type: application/pdf\r\nContent-Disposition: attachment; '
         'filename="../../etc/passwd\\"; x=y.pdf"', b"%PDF-1.4 hostile"),
        ("Content-Type: text/plain; charset=utf-8\r\nContent-Disposition: attachment; "
         "filename*=UTF-8''Gr%C3%BC%C3%9Fe%20%E2%82%AC.txt", "grüße".encode()),
        ('Content-Type: text/html\r\nContent-Disposition: attachment; filename="page.html"',
         b"<script>alert(1)</script>"),
        ('Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n'
         'Content-Disposition: attachment; filename="CON.png"', b"ZmFrZSBwbmc=")))
    page = alice.get(f"/mail/INBOX/{key}")
    found = links(page, "attachment")
    base = f"/mail/INBOX/{key.replace(',', '%2C').replace('=', '%3D')}/attachment/"
    assert [href for href, _ in found] == [base + str(n) for n in range(4)]
    names = [text for _, text in found]
    assert "/" not in names[0] and ".." not in names[0].split("_")[0]
    first = alice.get(f"/mail/INBOX/{key}/attachment/0")
    assert first.status == 200 and first.body == "%PDF-1.4 hostile"
    disposition = first.header("Content-Disposition")
    assert disposition.startswith('attachment; filename="') and "/" not in disposition
    assert "\r" not in disposition and "\n" not in disposition and "filename*" not in disposition
    assert first.header("X-Content-Type-Options") == "nosniff"
    assert first.header("Content-Security-Policy") == "default-src 'none'; sandbox"
    assert first.header("Content-Type") == "application/octet-stream"    # a browser would render PDF
    second = alice.get(f"/mail/INBOX/{key}/attachment/1")
    assert second.body == "grüße" and second.header("Content-Type").startswith("text/plain")
    assert second.header("Content-Disposition") == (
        "attachment; filename=\"Gr__e _.txt\"; filename*=UTF-8''Gr%C3%BC%C3%9Fe%20%E2%82%AC.txt")
    third = alice.get(f"/mail/INBOX/{key}/attachment/2")
    assert third.header("Content-Type") == "application/octet-stream"
    assert third.header("Content-Disposition") == 'attachment; filename="page.html"'
    assert alice.get(f"/mail/INBOX/{key}/attachment/3").header("Content-Disposition") == \
        'attachment; filename="_CON.png"'
    assert alice.get(f"/mail/INBOX/{key}/attachment/4").status == 404
    assert alice.get(f"/mail/INBOX/{key}/attachment/x").status == 404


# -- composing ----------------------------------------------------------------------------------------

def test_compose_with_an_attachment_goes_through_the_real_sender(mail, alice):
    form = alice.get("/mail/compose")
    assert form.status == 200
    assert re.search(r'<form id="compose"[^>]*method="post" action="/mail/compose" '
                     r'enctype="multipart/form-data"', form.body)
    assert '<button type="submit" id="send">' in form.body
    assert 'name="attachments" multiple' in form.body
    assert "Alice <alice@example.com>" in form.text
    reply = post_form(alice, "/mail/compose",
                      compose_fields(to="Bob <bob@example.org>", cc="carol@example.net",
                                     bcc="dave@example.net", subject="Grüße", body="Hello\r\nBob\r\n"),
                      [("attachments", "report.pdf", "application/pdf", b"%PDF-1.4\x00\xff data"),
                       ("attachments", "", "application/octet-stream", b"")])   # an empty file input
    assert reply.status == 303 and reply.location == "/mail/Sent"
    sent_page = alice.get("/mail/Sent")
    assert re.search(r'<p class="notice" role="status">Sent</p>', sent_page.body)
    assert [t for _, t in links(sent_page, "message")] == ["Grüße"]
    assert mail.kicks.count == 1
    outbound = mail.store.outbound
    entries = outbound.list()
    assert sorted(outbound.envelope(e).rcpt for e in entries) == [
        "bob@example.org", "carol@example.net", "dave@example.net"]
    envelope, data = outbound.read(entries[0])
    assert envelope.mail_from == "alice@example.com"
    assert b"Bcc:" not in data
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed["From"] == "Alice <alice@example.com>" and parsed["Subject"] == "Grüße"
    assert parsed.get_body(("plain",)).get_content().replace("\r\n", "\n") == "Hello\nBob\n"
    (part,) = parsed.iter_attachments()
    assert part.get_filename() == "report.pdf" and part.get_content() == b"%PDF-1.4\x00\xff data"
    (sent,) = mail.files("Sent")
    assert sent.endswith(":2,S")
    sent_copy = (mail.box() / ".Sent" / "cur" / sent).read_bytes()
    assert b"Bcc: dave@example.net" in sent_copy
    replay = mail.store.replay_queue("example.com")
    (copy,) = replay.list()
    envelope, data = replay.read(copy)
    assert envelope.rcpt == "alice@example.com"
    assert email.message_from_bytes(data, policy=email.policy.default)["Subject"] == "Grüße (CS-SENT)"


def test_a_refused_message_comes_back_with_everything_typed(mail, alice):
    alice.get("/mail/compose")
    reply = post_form(alice, "/mail/compose",
                      compose_fields(to="bob@exa mple", subject=f"s {EVIL}", body=f"my text\r\n{EVIL}"),
                      [("attachments", "notes.txt", "text/plain", b"keep me")])
    assert reply.status == 400
    assert "Not sent" in reply.text and "not a valid address" in reply.text
    assert field_value(reply, "to") == "bob@exa mple" and field_value(reply, "subject") == f"s {EVIL}"
    assert textarea(reply) == f"my text\r\n{EVIL}"
    assert "<script" not in reply.body
    kept = re.findall(r'<input type="checkbox" name="kept" value="([^"]+)" checked> notes.txt', reply.body)
    assert len(kept) == 1
    assert mail.store.outbound.list() == []
    again = post_form(alice, "/mail/compose", [*compose_fields(to="bob@example.org", subject="fixed",
                                                               body="my text"), ("kept", kept[0])])
    assert again.status == 303
    (entry,) = mail.store.outbound.list()
    parsed = email.message_from_bytes(mail.store.outbound.read(entry)[1], policy=email.policy.default)
    (part,) = parsed.iter_attachments()
    assert part.get_filename() == "notes.txt" and part.get_content() == "keep me"


def test_a_message_without_a_recipient_is_refused(mail, alice):
    alice.get("/mail/compose")
    reply = post_form(alice, "/mail/compose", compose_fields(subject="nobody", body="x"))
    assert reply.status == 400 and "no recipient" in reply.text
    assert field_value(reply, "subject") == "nobody"


def test_permanent_refusal_from_the_pipeline_is_shown_with_the_form(make_mail):
    async def refuse(user, sender, rcpts, data):
        raise PermFail(553, "5.7.1 The From: header must be your own address <alice@example.com>")
    mail = make_mail(submit=refuse)
    alice = logged_in(mail)
    alice.get("/mail/compose")
    reply = post_form(alice, "/mail/compose", compose_fields(to="bob@example.org", subject="s", body="b"))
    assert reply.status == 400
    assert "Not sent: 5.7.1 The From: header must be your own address" in reply.text
    assert field_value(reply, "to") == "bob@example.org" and textarea(reply) == "b"


def test_a_local_fault_keeps_the_form_and_says_nothing_internal(make_mail):
    async def broken(user, sender, rcpts, data):
        raise OSError("disk full at /secret/path")
    mail = make_mail(submit=broken)
    alice = logged_in(mail)
    alice.get("/mail/compose")
    reply = post_form(alice, "/mail/compose", compose_fields(to="bob@example.org", subject="s", body="b"))
    assert reply.status == 500 and "could not send this just now" in reply.text
    assert "/secret/path" not in reply.body and field_value(reply, "subject") == "s"


def test_the_webmail_keeps_to_max_recipients(mail, alice):
    """Security review 9.9: the webmail sent to 42 recipients with max_recipients: 5."""
    limit = mail.config.max_recipients
    alice.get("/mail/compose")
    many = ", ".join(f"u{n}@example.org" for n in range(limit + 1))
    reply = post_form(alice, "/mail/compose", compose_fields(to=many, subject="all", body="x"), [])
    assert reply.status == 400 and f"Too many recipients: at most {limit}" in reply.text
    assert mail.store.outbound.list() == []


def test_sending_disabled_says_so_and_offers_no_send_button(make_mail):
    mail = make_mail(sending=False)
    alice = logged_in(mail)
    page = alice.get("/mail/compose")
    assert page.status == 200 and SENDING_DISABLED in page.text
    assert 'id="send"' not in page.body
    reply = post_form(alice, "/mail/compose", compose_fields(to="bob@example.org", subject="s", body="b"))
    assert reply.status == 503 and SENDING_DISABLED in reply.text and field_value(reply, "subject") == "s"
    assert mail.store.outbound.list() == [] and mail.files("Sent") == []


def test_reply_reply_all_and_forward_fill_in_the_form(mail, alice):
    original = message("Question", body="What now?\r\n",
                       extra="Cc: Carol <carol@example.net>, alice@example.com\r\n")
    key = mail.put(original)
    message_id = re.search(rb"Message-ID: (<[^>]+>)", original).group(1).decode()
    page = alice.get(f"/mail/INBOX/{key}")
    quoted_key = key.replace(",", "%2C").replace("=", "%3D")
    for css, suffix in (("reply", "reply"), ("reply-all", "reply-all"), ("forward", "forward")):
        assert links(page, css) == [(f"/mail/INBOX/{quoted_key}/{suffix}", links(page, css)[0][1])]
    reply = alice.get(f"/mail/INBOX/{key}/reply")
    assert field_value(reply, "to") == "Bob <bob@example.org>" and field_value(reply, "cc") == ""
    assert field_value(reply, "subject") == "Re: Question"
    assert field_value(reply, "in_reply_to") == message_id and field_value(reply, "references") == message_id
    assert textarea(reply).startswith(
        "\n\nOn Tue, 01 Dec 2026 10:00, Bob <bob@example.org> wrote:\n> What now?")
    everyone = alice.get(f"/mail/INBOX/{key}/reply-all")
    assert field_value(everyone, "cc") == "Carol <carol@example.net>"
    forward = alice.get(f"/mail/INBOX/{key}/forward")
    assert field_value(forward, "to") == "" and field_value(forward, "subject") == "Fwd: Question"
    assert field_value(forward, "forward_folder") == "INBOX" and field_value(forward, "forward_key") == key
    assert "---------- Forwarded message ----------" in textarea(forward)


def test_sending_a_reply_and_a_forward_flags_the_original(mail, alice):
    original = message("Question")
    key = mail.put(original, seen=True)
    page = alice.get(f"/mail/INBOX/{key}/reply")
    sent = post_form(alice, "/mail/compose", [
        *compose_fields(to=field_value(page, "to"), subject=field_value(page, "subject"), body="Answer",
                        in_reply_to=field_value(page, "in_reply_to"),
                        references=field_value(page, "references")),
        ("reply_folder", "INBOX"), ("reply_key", key)])
    assert sent.status == 303
    assert mail.files() == [f"{key}:2,RS"]
    page = alice.get(f"/mail/INBOX/{key}/forward")
    sent = post_form(alice, "/mail/compose", [
        *compose_fields(to="carol@example.net", subject=field_value(page, "subject"), body=textarea(page)),
        ("forward_folder", "INBOX"), ("forward_key", key)])
    assert sent.status == 303
    assert mail.files() == [f"{key}:2,PRS"]
    entries = mail.store.outbound.list()
    forwarded = [mail.store.outbound.read(e)[1] for e in entries if mail.store.outbound.envelope(e).rcpt
                 == "carol@example.net"][0]
    assert original in forwarded                            # the original, byte for byte
    replied = [mail.store.outbound.read(e)[1] for e in entries if mail.store.outbound.envelope(e).rcpt
               == "bob@example.org"][0]
    assert b"In-Reply-To: <" in replied


def test_forwarding_a_message_that_is_gone_keeps_the_form(mail, alice):
    key = mail.put(message("Gone soon"))
    page = alice.get(f"/mail/INBOX/{key}/forward")
    alice.post(f"/mail/INBOX/{key}/delete")
    reply = post_form(alice, "/mail/compose", [
        *compose_fields(to="carol@example.net", subject=field_value(page, "subject"), body="fyi"),
        ("forward_folder", "INBOX"), ("forward_key", key)])
    assert reply.status == 400 and "no longer in its folder" in reply.text
    assert field_value(reply, "to") == "carol@example.net"
    assert mail.store.outbound.list() == []


# -- delete and move ----------------------------------------------------------------------------------

def test_delete_moves_to_trash_and_deleting_in_trash_removes(mail, alice):
    key = mail.put(message("bye"))
    page = alice.get(f"/mail/INBOX/{key}")
    assert re.search(r'<form class="delete" method="post" action="[^"]+/delete">', page.body)
    reply = alice.post(f"/mail/INBOX/{key}/delete")
    assert reply.status == 303 and reply.location == "/mail/INBOX"
    assert "Moved to Trash" in alice.get("/mail/INBOX").text
    assert mail.files() == [] and mail.files("Trash") == [f"{key}:2,S"]
    trash = alice.get("/mail/Trash")
    assert ("/mail/Trash", "Trash") in links(trash, "folder")
    assert "Delete for good" in alice.get(f"/mail/Trash/{key}").text
    assert alice.post(f"/mail/Trash/{key}/delete").location == "/mail/Trash"
    assert mail.files("Trash") == []
    assert "Deleted for good" in alice.get("/mail/Trash").text


def test_move_between_folders(mail, alice):
    make_folder(mail.box(), "Archive")
    key = mail.put(message("keep this"))
    page = alice.get(f"/mail/INBOX/{key}")
    select = re.search(r'<form class="move"[^>]*>.*?<select name="to">(.*?)</select>', page.body, re.S)[1]
    assert re.findall(r'<option value="([^"]+)">', select) == ["Sent", "Archive"]     # not here, not Outbox
    assert alice.post(f"/mail/INBOX/{key}/move", {"to": "Archive"}).location == "/mail/INBOX"
    assert mail.files() == [] and mail.files("Archive") == [f"{key}:2,S"]
    assert "Message moved" in alice.get("/mail/INBOX").text
    assert [t for _, t in links(alice.get("/mail/Archive"), "message")] == ["keep this"]
    assert alice.post(f"/mail/Archive/{key}/move", {"to": "Outbox"}).status == 400
    assert alice.post(f"/mail/Archive/{key}/move", {"to": "Nowhere"}).status == 404
    assert alice.post(f"/mail/Archive/{key}/move", {"to": "../../bob"}).status == 404
    assert mail.files("Archive") == [f"{key}:2,S"] and mail.files("Outbox") == []


# -- who may see what -----------------------------------------------------------------------------------

def test_another_users_mail_and_paths_outside_the_maildir_are_404(mail, alice):
    bobs = mail.put(message("for bob only"), user=BOB)
    mine = mail.put(message("mine"))
    for path in (f"/mail/INBOX/{bobs}", f"/mail/INBOX/{bobs}/html", f"/mail/INBOX/{bobs}/attachment/0",
                 f"/mail/INBOX/{bobs}/reply", f"/mail/INBOX/{bobs}/forward",
                 "/mail/..%2F..%2Fexample.com%2Fbob", "/mail/..%2Fbob", "/mail/.Sent", "/mail/Sent.",
                 "/mail/%2E%2E", "/mail/INBOX/..%2F..%2Fbob%2Fnew%2F" + bobs, "/mail/INBOX/%2E%2E",
                 f"/mail/INBOX/{mine}%2F..", "/mail/Nowhere", "/mail/INBOX/nokey", "/mail/a%00b"):
        reply = alice.get(path)
        assert reply.status == 404, path
        assert "for bob only" not in reply.body
    for path in (f"/mail/INBOX/{bobs}/delete", f"/mail/INBOX/{bobs}/unread", "/mail/..%2Fbob/x/delete"):
        assert alice.post(path).status == 404, path
    assert alice.post(f"/mail/INBOX/{bobs}/move", {"to": "Sent"}).status == 404
    assert mail.files(user=BOB) == [bobs]
    bob = logged_in(mail, "bob@example.com")
    assert bob.get(f"/mail/INBOX/{mine}").status == 404
    assert [t for _, t in links(bob.get("/mail/INBOX"), "message")] == ["for bob only"]


def test_the_webmail_needs_a_user_login(mail):
    visitor, admin = Client(mail.port), Client(mail.port)
    admin.login_admin()
    key = mail.put(message("private"))
    for browser in (visitor, admin):
        for path in ("/mail", "/mail/INBOX", f"/mail/INBOX/{key}", f"/mail/INBOX/{key}/html",
                     f"/mail/INBOX/{key}/attachment/0", "/mail/compose"):
            assert browser.get(path).location == "/login", path
    assert mail.files() == [key]                          # not marked read


def test_changes_without_the_csrf_token_are_refused_and_change_nothing(mail, alice):
    make_folder(mail.box(), "Archive")
    key = mail.put(message("stay"), seen=True)
    alice.get(f"/mail/INBOX/{key}")
    for path, fields in ((f"/mail/INBOX/{key}/delete", {}), (f"/mail/INBOX/{key}/move", {"to": "Archive"}),
                         (f"/mail/INBOX/{key}/unread", {})):
        assert alice.post(path, fields, csrf=False).status == 403
        assert alice.post(path, fields, csrf="forged").status == 403
    reply = post_form(alice, "/mail/compose", compose_fields(to="bob@example.org", subject="s", body="b"),
                      csrf=False)
    assert reply.status == 403
    assert mail.files() == [f"{key}:2,S"] and mail.files("Archive") == []
    assert mail.store.outbound.list() == [] and mail.files("Sent") == []


def test_mail_pages_fetch_nothing_from_elsewhere_run_no_script_and_fit_a_phone(mail, alice):
    key = mail.put(HTML_MAIL)
    plain = mail.put(attachment_mail(('Content-Type: text/plain\r\nContent-Disposition: attachment; '
                                      'filename="a.txt"', b"x")))
    for path in ("/mail/INBOX", f"/mail/INBOX/{key}", f"/mail/INBOX/{plain}", "/mail/compose",
                 f"/mail/INBOX/{key}/reply", f"/mail/INBOX/{key}/forward", "/mail/Sent"):
        reply = alice.get(path)
        assert reply.status == 200, path
        assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in reply.body
        assert "<script" not in reply.body and " style=" not in reply.body and "<style" not in reply.body
        for url in re.findall(r'(?:src|href|action)="([^"]*)"', reply.body):
            assert url.startswith("/") and not url.startswith("//"), (path, url)
        assert reply.header("Content-Security-Policy").startswith("default-src 'self'")
        assert reply.header("Cache-Control") == "no-store"


# -- the whole relay ------------------------------------------------------------------------------------

def with_web(config_path: Path, extra: str = ""):
    """The test configuration plus `extra`, with listen.web on a free port and users in place."""
    config_path.write_text(config_path.read_text() + extra)
    config = load(config_path)
    config = dataclasses.replace(config, listen=dataclasses.replace(config.listen,
                                                                    web=HostPort("127.0.0.1", 0)))
    prepare(config)
    return config


def test_serve_wires_the_webmail_to_the_outbound_queue_and_the_smarthost(config_path):
    import time
    smarthost = FakePrimary().start()
    try:
        relay = InProcessRelay(with_web(config_path, (
            f"outbound: {{smarthost: {{address: 127.0.0.1:{smarthost.port}, starttls: off}}, "
            "retry_delay: 1s}\n"))).start()
        try:
            alice = logged_in(relay.running.web.addresses[0][1])
            assert 'id="send"' in alice.get("/mail/compose").body
            reply = post_form(alice, "/mail/compose",
                              compose_fields(to="bob@example.org", subject="from the web", body="hi"))
            assert reply.status == 303 and reply.location == "/mail/Sent"
            deadline = time.monotonic() + 15
            while not smarthost.received:
                assert time.monotonic() < deadline, "the smarthost got nothing"
                time.sleep(0.05)
            (got,) = smarthost.received
            assert got.mail_from == "alice@example.com" and got.rcpt_tos == ["bob@example.org"]
            assert b"Subject: from the web" in got.content
            assert [t for _, t in links(alice.get("/mail/Sent"), "message")] == ["from the web"]
        finally:
            relay.stop()
    finally:
        smarthost.stop()


def test_serve_without_a_smarthost_says_sending_is_off(config_path):
    relay = InProcessRelay(with_web(config_path)).start()
    try:
        alice = logged_in(relay.running.web.addresses[0][1])
        page = alice.get("/mail/compose")
        assert SENDING_DISABLED in page.text and 'id="send"' not in page.body
    finally:
        relay.stop()


# -- malformed headers from a remote sender (issue 9.3) ---------------------------------------------

MALFORMED_SUBJECTS = [b"=?x\x00?q?boom?=", b"\xe9 =?x\x00?q?boom?=", b"=?utf-8?b?####?=",
                      b"=?nonexistent-charset?q?a?=", b"=?utf-8*\x00?q?a?="]


@pytest.mark.parametrize("subject", MALFORMED_SUBJECTS)
def test_a_malformed_subject_never_breaks_the_inbox(mail, alice, subject):
    """Before the fix `Subject: =?x\\x00?q?boom?=` made every page of /mail/INBOX answer 500."""
    data = message().replace(b"Subject: hello", b"Subject: " + subject)
    data = data.replace(b"\r\n\r\n", b"\r\nContent-Type: text/plain; charset=\"x\x00\"\r\n"
                        b"Content-Disposition: attachment; filename*=x\x00''%ff\r\n\r\n", 1)
    key = mail.put(data)
    page = alice.get("/mail/INBOX")
    assert page.status == 200
    assert len(links(page, "message")) == 1
    assert alice.get(f"/mail/INBOX/{key.replace(',', '%2C').replace('=', '%3D')}").status == 200
