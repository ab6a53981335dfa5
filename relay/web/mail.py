"""The webmail: where a logged-in user reads and writes mail in their own continuity mailbox.

    GET  /mail                                    -> /mail/INBOX
    GET  /mail/compose                            the compose form (`?to=` fills in a recipient)
    POST /mail/compose                            send it: the same pipeline as the submission port
    GET  /mail/{folder}?page=N                    the folder's messages, newest first, 25 a page
                                                  (a folder named archive, compose or folder:
                                                  /mail/folder/{folder}..., see `folder_url`)
    GET  /mail/{folder}/{key}                     one message (marks it read: flag S); `?view=text`
    GET  /mail/{folder}/{key}/html                its sanitised HTML, for the sandboxed iframe only
    GET  /mail/{folder}/{key}/attachment/{n}      attachment n as a download
    GET  /mail/{folder}/{key}/reply|reply-all|forward     the compose form, filled in
    POST /mail/{folder}/{key}/delete              to Trash; in Trash, removed for good
    POST /mail/{folder}/{key}/move                into the folder named by the field `to`
    POST /mail/{folder}/{key}/unread              clear the read flag again

Who sees what: every handler works on the logged-in user's own Maildir (`account_of(request)`),
so a URL can name a folder and key but never another user; folder names and keys are checked by
`MaildirStore` (`MaildirPathError` -> 404), which is also the only thing here that touches the
Maildir, always through `asyncio.to_thread` (as are parsing, rendering a message and building
one). Flags are Maildir file-name flags, so Dovecot's IMAP clients see the same read state.

What a message page may show: plain text escaped in a <pre>; HTML only as `relay.webmail.render`
sanitised it, and then only inside an <iframe sandbox> whose document is served with its own
policy (`FRAME_POLICY`: no script, nothing fetched but `data:` images, a sandboxed origin even
when opened on its own); attachments only as downloads (`Content-Disposition: attachment`,
nosniff, a sandboxing policy, types a browser would run sent as application/octet-stream).

Sending: `relay.webmail.compose.build` makes the message (From: the user's name and address),
then the `submit` pipeline app.py hands over (`Submitter.submit` in a thread, then a kick of the
outbound runner) queues it, files the Sent copy and the "(CS-SENT)" replay copy. Without a
smarthost there is no pipeline: the compose page says sending is off and offers no Send button.
A refused message comes back as the form with what was typed; uploaded attachments come back
as checkboxes carrying their data (unticked, they are dropped), since a browser cannot refill
a file input. A forward names the original by folder and key and reads it again at send time.

Notices after a change ("Sent", "Moved to Trash"...) ride in a short-lived cookie, so the page
the browser lands on has a plain URL (`/mail/Sent`).

Without a Maildir store (`make_app(..., maildirs=None)`) `/mail` only says the webmail is not
available here, and no other route exists.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from email.utils import getaddresses
from typing import TypeVar
from urllib.parse import quote

from aiohttp import web

from relay.addresses import Mailbox
from relay.directory import User
from relay.errors import PermFail
from relay.log import event
from relay.storage.maildir import (
    ANSWERED,
    INBOX,
    PASSED,
    SEEN,
    TRASH,
    MaildirPathError,
    MaildirStore,
    Summary,
    check_folder,
    folder_label,
)
from relay.web.login import account_of, user_only
from relay.web.page import redirect, render
from relay.web.site import site_of
from relay.webmail import compose
from relay.webmail.render import MessageView, NoAttachmentError, attachment, view

_T = TypeVar("_T")

Submit = Callable[[User, str, list[str], bytes], Awaitable[str]]
"""(user, envelope sender, envelope recipients, message) -> outbound queue id; raises PermFail
when the message is refused (app.py's `_submit_and_kick`, as the submission port uses it)."""

PAGE_SIZE = 25
OUTBOX = "Outbox"                           # a message moved here would be sent: not a move target
SENT_LIKE = frozenset({"Sent", "Drafts", OUTBOX})   # list these by recipient, not by sender
FRAME_POLICY = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
                "form-action 'none'; frame-ancestors 'self'; "
                "sandbox allow-popups allow-popups-to-escape-sandbox")
DOWNLOAD_POLICY = "default-src 'none'; sandbox"
# Types a browser renders or runs itself: downloaded as bytes whatever the message says.
ACTIVE_TYPES = frozenset({"text/html", "application/xhtml+xml", "image/svg+xml", "text/xml",
                          "application/xml", "text/javascript", "application/javascript",
                          "application/pdf", "multipart/x-mixed-replace"})
HTML_DOCUMENT = ('<!doctype html>\n<html><head><meta charset="utf-8">'
                 '<meta name="viewport" content="width=device-width, initial-scale=1">'
                 '</head><body>\n{}\n</body></html>\n')

NOTICE_COOKIE = "relay_mail_notice"
NOTICES = {"sent": "Sent", "trashed": "Moved to Trash", "deleted": "Deleted for good",
           "moved": "Message moved", "unread": "Marked as unread"}
SENDING_DISABLED = ("Sending is switched off on this relay (no outbound smarthost is configured), "
                    "so mail cannot be sent from here. Reading mail works as usual.")


@dataclass(frozen=True)
class Webmail:
    """What app.py hands the webmail through `make_app` / `start_web`."""

    maildirs: MaildirStore | None = None    # None: no webmail on this site
    submit: Submit | None = None            # None: sending is disabled (no outbound.smarthost)


WEBMAIL = web.AppKey("webmail", Webmail)


def _webmail(request: web.Request) -> Webmail:
    return request.config_dict[WEBMAIL]


def _store(request: web.Request) -> MaildirStore:
    store = _webmail(request).maildirs
    assert store is not None        # the routes that call this exist only with a store
    return store


def _me(request: web.Request) -> Mailbox:
    return account_of(request).address


async def _maildir(call: Callable[..., _T], *args: object) -> _T:
    """A blocking Maildir call in a worker thread; a refused folder or key is a 404."""
    try:
        return await asyncio.to_thread(call, *args)
    except MaildirPathError:
        raise web.HTTPNotFound() from None


async def _page(request: web.Request, template: str, status: int = 200, **context: object) -> web.Response:
    """Render in a worker thread: a long message or kept attachments must not hold the loop."""
    return await asyncio.to_thread(render, request, template, status, **context)


# -- URLs and what templates show ------------------------------------------------------------------

# Folder names our own routes take after /mail/ (`compose` here, `archive` in web/archive.py,
# `folder` for the form below): such a folder's pages live under /mail/folder/<name>/, where
# nothing else does; every other folder keeps its plain /mail/<name> URLs.
ROUTE_NAMES = frozenset({"archive", "compose", "folder"})


def folder_url(folder: str, page: int = 1) -> str:
    url = ("/mail/folder/" if folder in ROUTE_NAMES else "/mail/") + quote(folder, safe="")
    return f"{url}?page={page}" if page > 1 else url


def message_url(folder: str, key: str) -> str:
    return f"{folder_url(folder)}/{quote(key, safe='')}"


@dataclass(frozen=True)
class Folder:
    name: str
    label: str
    url: str


def _folders(names: list[str]) -> list[Folder]:
    return [Folder(name, folder_label(name), folder_url(name)) for name in names]


def when(moment: datetime | float | None) -> str:
    """A date as the sender wrote it (its own zone), or a file time in UTC."""
    if isinstance(moment, (int, float)):
        moment = datetime.fromtimestamp(moment, UTC) if moment else None
    return moment.strftime("%Y-%m-%d %H:%M") if moment is not None else ""


def people(header: str) -> str:
    """Who a From: or To: names, for a list: display names where there are any, else addresses."""
    try:
        found = getaddresses([header])
    except (ValueError, TypeError, IndexError):
        return header
    names = [name or address for name, address in found if name or address]
    return ", ".join(names) if names else header


def _size(count: int) -> str:
    for unit, size in (("MB", 1024 * 1024), ("kB", 1024)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


def _notice(request: web.Request, response: web.StreamResponse, key: str) -> web.StreamResponse:
    """Say `NOTICES[key]` on the next mail page the browser shows."""
    response.set_cookie(NOTICE_COOKIE, key, path="/mail", max_age=60, httponly=True, samesite="Strict",
                        secure=site_of(request).sessions.secure)
    return response


def _take_notice(request: web.Request) -> str | None:
    return NOTICES.get(request.cookies.get(NOTICE_COOKIE, ""))


def _forget_notice(request: web.Request, response: web.StreamResponse) -> None:
    if NOTICE_COOKIE in request.cookies:
        response.del_cookie(NOTICE_COOKIE, path="/mail")


# -- folders and the message list -----------------------------------------------------------------

@user_only
async def index(request: web.Request) -> web.StreamResponse:
    if _webmail(request).maildirs is None:
        return render(request, "mail/index.html", user=account_of(request))
    return redirect(folder_url(INBOX))


def _page_number(text: str | None) -> int:
    try:
        return max(1, int(text or 1))
    except ValueError:
        return 1


@dataclass(frozen=True)
class Listing:
    folders: list[str]
    total: int
    page: int
    pages: int
    messages: list[Summary]


def _listing(store: MaildirStore, user: Mailbox, folder: str, page: int) -> Listing:
    """One page of a folder (blocking); a page past the end shows the last one."""
    names = store.folders(user)
    total, found = store.messages(user, folder, (page - 1) * PAGE_SIZE, PAGE_SIZE)
    pages = max(1, -(-total // PAGE_SIZE))
    if page > pages:
        page = pages
        total, found = store.messages(user, folder, (page - 1) * PAGE_SIZE, PAGE_SIZE)
    return Listing(names, total, page, pages, found)


@user_only
async def folder_page(request: web.Request) -> web.StreamResponse:
    try:
        folder = check_folder(request.match_info["folder"])
    except MaildirPathError:
        raise web.HTTPNotFound() from None
    listing = await _maildir(_listing, _store(request), _me(request), folder,
                             _page_number(request.query.get("page")))
    first = (listing.page - 1) * PAGE_SIZE
    response = await _page(
        request, "mail/folder.html", folders=_folders(listing.folders), folder=folder,
        label=folder_label(folder), listing=listing, first=first + 1 if listing.total else 0,
        last=first + len(listing.messages), sent_like=folder in SENT_LIKE, message_url=message_url,
        folder_url=folder_url, when=when, people=people, done=_take_notice(request))
    _forget_notice(request, response)
    return response


# -- one message ---------------------------------------------------------------------------------

def _folder_and_key(request: web.Request) -> tuple[str, str]:
    try:
        return check_folder(request.match_info["folder"]), request.match_info["key"]
    except MaildirPathError:
        raise web.HTTPNotFound() from None


def _open(store: MaildirStore, user: Mailbox, folder: str, key: str,
          mark: bool) -> tuple[list[str], MessageView]:
    """(the user's folders, the message as shown) (blocking); `mark` sets the read flag."""
    data = store.read(user, folder, key)
    if mark:
        store.set_flags(user, folder, key, add=SEEN)
    return store.folders(user), view(data)


@user_only
async def message_page(request: web.Request) -> web.StreamResponse:
    folder, key = _folder_and_key(request)
    names, shown = await _maildir(_open, _store(request), _me(request), folder, key, request.method != "HEAD")
    as_text = request.query.get("view") == "text" or shown.raw or shown.html is None
    url = message_url(folder, key)
    targets = [f for f in _folders(names) if f.name not in (folder, OUTBOX)]
    return await _page(
        request, "mail/message.html", folders=_folders(names), folder=folder, label=folder_label(folder),
        key=key, url=url, message=shown, as_text=as_text, when=when, size=_size, targets=targets,
        in_trash=folder == TRASH, folder_url=folder_url)


def _html_of(store: MaildirStore, user: Mailbox, folder: str, key: str) -> str | None:
    return view(store.read(user, folder, key)).html


@user_only
async def message_html(request: web.Request) -> web.StreamResponse:
    """The sanitised HTML as a document of its own, for the message page's sandboxed iframe."""
    folder, key = _folder_and_key(request)
    html = await _maildir(_html_of, _store(request), _me(request), folder, key)
    if html is None:
        raise web.HTTPNotFound()
    response = web.Response(text=HTML_DOCUMENT.format(html), content_type="text/html")
    response.headers["Content-Security-Policy"] = FRAME_POLICY
    response.headers["X-Frame-Options"] = "SAMEORIGIN"
    return response


def content_disposition(filename: str) -> str:
    """`attachment` with an ASCII `filename` and, for other names, RFC 5987's `filename*`."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename)
    value = f'attachment; filename="{fallback}"'
    if not filename.isascii():
        value += "; filename*=UTF-8''" + quote(filename, safe="!#$&+-.^_`|~")
    return value


def _attachment_of(store: MaildirStore, user: Mailbox, folder: str, key: str,
                   index: int) -> tuple[str, str, bytes] | None:
    try:
        return attachment(store.read(user, folder, key), index)
    except NoAttachmentError:
        return None


@user_only
async def download(request: web.Request) -> web.StreamResponse:
    folder, key = _folder_and_key(request)
    found = await _maildir(_attachment_of, _store(request), _me(request), folder, key,
                           int(request.match_info["n"]))
    if found is None:
        raise web.HTTPNotFound()
    filename, content_type, data = found
    if content_type in ACTIVE_TYPES:
        content_type = "application/octet-stream"
    response = web.Response(body=data, content_type=content_type)
    response.headers["Content-Disposition"] = content_disposition(filename)
    response.headers["Content-Security-Policy"] = DOWNLOAD_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


# -- changes: delete, move, unread -----------------------------------------------------------------

def _text(form, name: str) -> str:
    value = form.get(name, "")
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else ""


@user_only
async def change(request: web.Request) -> web.StreamResponse:
    store, me = _store(request), _me(request)
    folder, key = _folder_and_key(request)
    action = request.match_info["action"]
    if action == "delete":
        left = await _maildir(store.delete, me, folder, key)
        notice = "trashed" if left is not None else "deleted"
    elif action == "move":
        target = _text(await request.post(), "to")
        if target == OUTBOX:    # the Outbox sends what lands in it: write a new message instead
            raise web.HTTPBadRequest()
        await _maildir(store.move_message, me, folder, key, target)
        notice = "moved"
    else:
        await _maildir(store.set_flags, me, folder, key, "", SEEN)
        notice = "unread"
    event("webmail.changed", user=str(me), action=action, folder=folder)
    return _notice(request, redirect(folder_url(folder)), notice)


# -- composing -------------------------------------------------------------------------------------

Kept = tuple[str, str, bytes]       # an attachment sent with the form before: (name, type, bytes)


@dataclass(frozen=True)
class Form:
    """The compose form's fields, as typed (or as a reply or forward fills them in)."""

    to: str = ""
    cc: str = ""
    bcc: str = ""
    subject: str = ""
    body: str = ""
    in_reply_to: str = ""
    references: str = ""
    reply_folder: str = ""          # the message answered: flagged R once this is sent
    reply_key: str = ""
    forward_folder: str = ""        # the message forwarded: read again and attached at send time
    forward_key: str = ""
    forward_name: str = ""          # its attachment's name, for the page only
    kept: tuple[Kept, ...] = field(default=())

    @classmethod
    def read(cls, form) -> Form:
        values = {f.name: _text(form, f.name) for f in fields(cls) if f.name != "kept"}
        return cls(**values, kept=tuple(filter(None, map(_unpack, form.getall("kept", [])))))


def _pack(kept: Kept) -> str:
    """An attachment as the value of a checkbox: `b64(name):type:b64(data)`."""
    name, content_type, data = kept
    return ":".join((base64.b64encode(name.encode("utf-8")).decode("ascii"), content_type,
                     base64.b64encode(data).decode("ascii")))


def _unpack(value: object) -> Kept | None:
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str):
        return None
    try:
        name, content_type, data = value.split(":", 2)
        return (base64.b64decode(name, validate=True).decode("utf-8"), content_type,
                base64.b64decode(data, validate=True))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None


def _from_header(user: User) -> str:
    """The user's name and address for From:, or the address alone when the name will not do."""
    name = " ".join(user.name.split())
    if not name:
        return user.email
    if any(c in name for c in '()<>[]:;@\\,."'):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    header = f"{name} <{user.email}>"
    try:
        return header if compose.recipients(header) == [user.email] else user.email
    except compose.ComposeError:
        return user.email


async def _compose_page(request: web.Request, form: Form, status: int = 200,
                        error: str | None = None) -> web.Response:
    hook, user = _webmail(request), account_of(request)
    return await _page(
        request, "mail/compose.html", status, form=form, error=error, sending=hook.submit is not None,
        disabled=SENDING_DISABLED, sender=_from_header(user), size=_size, pack=_pack,
        original=message_url(form.forward_folder, form.forward_key)
        if form.forward_folder and form.forward_key else None)


@user_only
async def compose_form(request: web.Request) -> web.StreamResponse:
    return await _compose_page(request, Form(to=request.query.get("to", "")))


def _draft(store: MaildirStore, user: Mailbox, folder: str, key: str, mode: str) -> Form:
    """The compose form for a reply, reply to all, or forward of a stored message (blocking)."""
    original = store.read(user, folder, key)
    if mode == "forward":
        draft = compose.forward(original)
        return Form(subject=draft.subject, body=draft.body, forward_folder=folder, forward_key=key,
                    forward_name=draft.attachments[0][0])
    draft = compose.reply(original, user, all=mode == "reply-all")
    return Form(to=draft.to, cc=draft.cc, subject=draft.subject, body=draft.body,
                in_reply_to=draft.in_reply_to or "", references=draft.references or "",
                reply_folder=folder, reply_key=key)


@user_only
async def reply_form(request: web.Request) -> web.StreamResponse:
    folder, key = _folder_and_key(request)
    form = await _maildir(_draft, _store(request), _me(request), folder, key, request.match_info["mode"])
    return await _compose_page(request, form)


class Refused(Exception):
    """The message cannot be sent as it stands; the form comes back with this and `status`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _collect(form: Form, uploads: list[web.FileField]) -> tuple[Kept, ...]:
    """The attachments to send: those kept from before, then the new uploads (blocking)."""
    added = tuple((upload.filename, upload.content_type or "application/octet-stream", upload.file.read())
                  for upload in uploads)
    return form.kept + added


def _build(store: MaildirStore, user: User, form: Form, limit: int) -> tuple[bytes, list[str]]:
    """The message and its envelope recipients (blocking); Refused when it cannot go."""
    if sum(len(data) for _, _, data in form.kept) > limit:
        raise Refused(f"The attachments are larger than the relay sends ({_size(limit)} at most).", 413)
    forwarded: tuple[Kept, ...] = ()
    if form.forward_folder or form.forward_key:
        try:
            forwarded = compose.forward(store.read(user.address, form.forward_folder, form.forward_key)
                                        ).attachments
        except MaildirPathError:
            raise Refused("The message you are forwarding is no longer in its folder, so it cannot be "
                          "attached. Forward it again from where it is now.") from None
    try:
        data = compose.build(_from_header(user), form.to, form.cc, form.bcc, form.subject, form.body,
                             attachments=forwarded + form.kept, in_reply_to=form.in_reply_to or None,
                             references=form.references or None)
        rcpts = compose.recipients(form.to, form.cc, form.bcc)
    except compose.ComposeError as exc:
        raise Refused(f"Not sent: {exc}.") from None
    if len(data) > limit:
        raise Refused(f"The message is {_size(len(data))}, larger than the relay sends "
                      f"({_size(limit)} at most).", 413)
    return data, rcpts


def _mark_original(store: MaildirStore, user: Mailbox, form: Form) -> None:
    """Flag the message answered (R) or forwarded (P), as IMAP clients do; gone is fine."""
    for folder, key, flag in ((form.reply_folder, form.reply_key, ANSWERED),
                              (form.forward_folder, form.forward_key, PASSED)):
        if folder and key:
            try:
                store.set_flags(user, folder, key, add=flag)
            except MaildirPathError:
                pass    # moved or deleted meanwhile: nothing to flag
            except OSError as exc:  # the message is sent: a flag left unset is no reason to say otherwise
                event("webmail.flag_failed", logging.WARNING, user=str(user), folder=folder,
                      error=exc.strerror or type(exc).__name__)


@user_only
async def send(request: web.Request) -> web.StreamResponse:
    hook, user, store = _webmail(request), account_of(request), _store(request)
    posted = await request.post()
    form = Form.read(posted)
    uploads = [u for u in posted.getall("attachments", []) if isinstance(u, web.FileField) and u.filename]
    form = replace(form, kept=await asyncio.to_thread(_collect, form, uploads))
    if hook.submit is None:
        return await _compose_page(request, form, 503, SENDING_DISABLED)
    limit = site_of(request).config.message_size_limit
    try:
        data, rcpts = await asyncio.to_thread(_build, store, user, form, limit)
        queue_id = await hook.submit(user, user.email, rcpts, data)
    except Refused as exc:
        return await _compose_page(request, form, exc.status, str(exc))
    except PermFail as exc:
        event("webmail.refused", user=user.email, code=exc.code, detail=exc.text)
        return await _compose_page(request, form, 400, f"Not sent: {exc.text}")
    except Exception as exc:  # noqa: BLE001 - a local fault: the form comes back, nothing typed is lost
        event("webmail.send_failed", logging.ERROR, user=user.email, error=type(exc).__name__,
              detail=exc)
        return await _compose_page(request, form, 500, "The relay could not send this just now. Try again "
                                   "in a moment; if this stays, the relay's log says why.")
    event("webmail.sent", id=queue_id, user=user.email, size=len(data), rcpts=len(rcpts))
    await asyncio.to_thread(_mark_original, store, user.address, form)
    return _notice(request, redirect(folder_url("Sent")), "sent")


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/mail", index, name="mail")
    if app[WEBMAIL].maildirs is None:
        return
    r.add_get("/mail/compose", compose_form, name="mail_compose")
    r.add_post("/mail/compose", send)
    for base, named in (("/mail/folder/{folder}", False), ("/mail/{folder}", True)):  # see folder_url
        def name(what: str, named: bool = named) -> str | None:
            return f"mail_{what}" if named else None
        r.add_get(base, folder_page, name=name("folder"))
        r.add_get(base + "/{key}", message_page, name=name("message"))
        r.add_get(base + "/{key}/html", message_html, name=name("html"))
        r.add_get(base + r"/{key}/attachment/{n:\d{1,6}}", download, name=name("attachment"))
        r.add_get(base + "/{key}/{mode:reply|reply-all|forward}", reply_form, name=name("reply"))
        r.add_post(base + "/{key}/{action:delete|move|unread}", change, name=name("change"))
