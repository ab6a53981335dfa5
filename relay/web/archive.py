"""The archive on the web: administrators search, read, release, hold and export all of it (the
panel's Archive tab); a user searches their own and restores a message to their INBOX.

    GET  /panel/archive                      search: words, user, from, to, subject, direction,
                                             since, until, attachment; newest first, 50 a page,
                                             as many pages as there are
    GET  /panel/archive/export               the same search as a download: mbox (`format=mbox`)
                                             or a zip of .eml files (`format=eml-zip`) (audited)
    GET  /panel/archive/holds                the legal holds
    POST /panel/archive/holds/{add|remove}   field `who`: an address or @domain (audited)
    GET  /panel/archive/{id}                 one message: its record (the envelope), its headers
                                             and text, a release form
    GET  /panel/archive/{id}/eml             the message as archived, a download (audited)
    POST /panel/archive/{id}/release         to its recipients of ours, or to the field `to`
                                             (one audit line a copy)
    GET  /mail/archive                       the user's own archive, searched
    GET  /mail/archive/{id}                  one of their messages; anyone else's is a 404
    POST /mail/archive/{id}/restore          a copy to their own INBOX (audited)

Who sees what: an administrator sees every message with its whole envelope. A user's search is
always `Query(mailbox=<their address>)`, whatever the request says: the messages where they are
an envelope recipient (a Bcc too) or the sending user, never one that only names them as its
envelope sender (mail from outside sets that as it likes). A message page checks the same of
the record (`_theirs`) and answers 404 otherwise, as for an id that does not exist. A user is
shown the message's own headers, never its envelope: the recipients there would name the other
Bcc recipients.

A message is shown as the webmail shows one (`relay.webmail.render.view`), as text only: the
text/plain part, else the text made from the HTML, escaped in a <pre>. Archived HTML is never
rendered, not even sanitised. Every blocking call (the index, the archive's files, the holds
file, parsing, rendering, a release, an export) runs in a worker thread.

A release (`relay.storage.release`) goes to the primary through the domain's replay queue or,
during an outage, into the continuity mailbox (and is replayed from there); the page says which.
After a change the browser is sent to a plain page with `?done=<key>`: the notice is one of the
fixed texts here, so a link cannot make a page say anything else.

Without the archive (`storage.archive` unset: `make_app(..., archive=None)`) both tabs say the
archive is off, and no other archive route exists.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import BinaryIO
from urllib.parse import urlencode

from aiohttp import web

from relay import headers
from relay.addresses import AddressError, Mailbox, parse_mailbox
from relay.errors import CorruptEntryError, EntryError, StorageError
from relay.log import event
from relay.storage.archive import Archive, Record
from relay.storage.archive_export import FORMATS, export
from relay.storage.archive_index import ArchiveIndex, Query
from relay.storage.continuity import ContinuityStore
from relay.storage.release import Released, release
from relay.web.login import account_of, admin_only, audit_admin, user_only
from relay.web.mail import DOWNLOAD_POLICY, content_disposition
from relay.web.page import form_text, redirect, render
from relay.web.site import site_of
from relay.webmail.render import MessageView, view

PER_PAGE = 50
HEAD_LIMIT = 64 * 1024          # bytes of a message read for a result row's Subject and From
CHUNK = 1024 * 1024             # bytes of an export sent at a time
RCPTS_SHOWN = 5                 # envelope recipients on a result row; the message page has them all
ID_PATTERN = r"{id:\d{8}\.\d{1,10}}"
EXPORT_TYPES = {"mbox": "application/mbox", "eml-zip": "application/zip"}
EXPORT_SUFFIX = {"mbox": "mbox", "eml-zip": "zip"}

OFF = ("The archive is off on this relay (storage.archive is not set), so there is nothing to "
       "search here.")
PANEL_DONE = {
    "primary": "Released to the primary: a copy is in the domain's replay queue, handed over on its "
               "next sweep (once the primary is back, should it be down).",
    "continuity": "Released into the continuity mailbox (the domain is in outage): it can be read "
                  "there now, in the webmail and over IMAP, and is replayed to the primary once it "
                  "is back.",
    "both": "Released: some copies into continuity mailboxes (their domain is in outage), the "
            "others to the primary through the replay queue.",
}
MAIL_DONE = {
    "continuity": "Restored to your INBOX here: your mail server is down just now, so it is in "
                  "your continuity mailbox (this webmail, IMAP), and reaches your usual mailbox "
                  "once that is back.",
    "primary": "Restored: a copy is on its way to your usual mailbox on your mail server. It "
               "arrives there, not in this continuity mailbox.",
}
HOLDS_DONE = {"add": "Hold added: this mail is never purged until the hold is removed.",
              "remove": "Hold removed: the daily purge drops this mail once it is past its date.",
              "already": "Already held: nothing changed."}


@dataclass(frozen=True)
class ArchiveWeb:
    """What app.py hands the archive pages through `make_app` / `start_web`."""

    archive: Archive | None = None            # None: the archive is off
    index: ArchiveIndex | None = None
    store: ContinuityStore | None = None      # where a release puts its copies
    holds_lock: threading.Lock = field(default_factory=threading.Lock, compare=False)


ARCHIVE = web.AppKey("archive", ArchiveWeb)


def _hook(request: web.Request) -> ArchiveWeb:
    return request.config_dict[ARCHIVE]


async def _page(request: web.Request, template: str, status: int = 200, **context: object) -> web.Response:
    """Render in a worker thread: a long message must not hold the loop."""
    return await asyncio.to_thread(render, request, template, status, **context)


def _line(text: str, limit: int = 300) -> str:
    """A header value on one line, without control characters, at most `limit` characters."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())[:limit]


def _utc(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _normal(address: str) -> str:
    """An address as the index compares it: normalised where it parses, lower-cased anyway."""
    try:
        return str(parse_mailbox(address)).lower()
    except AddressError:
        return address.strip().lower()


def _theirs(record: Record, user: Mailbox) -> bool:
    """The record is the user's own: an envelope recipient (Bcc included) or the sending user,
    as `Query.mailbox` finds them; never the envelope sender alone (anyone can claim that)."""
    me = _normal(str(user))
    return any(_normal(a) == me for a in (record.user, *record.rcpts) if a)


# -- the search form -------------------------------------------------------------------------------

FIELDS = ("words", "user", "from", "to", "subject", "direction", "since", "until", "attachment")
LABELS = {"user": "User", "from": "From", "to": "To", "since": "Since", "until": "Until"}


class Refused(Exception):
    """A form says something that cannot be used, or a release could not be made: the text says
    why, `status` is the answer's."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _address(values: dict[str, str], name: str) -> str | None:
    text = values[name]
    if not text:
        return None
    try:
        return str(parse_mailbox(text))
    except AddressError as exc:
        raise Refused(f"{LABELS[name]}: {text!r} is not an address ({exc}).") from None


def _day(values: dict[str, str], name: str) -> date | None:
    text = values[name]
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise Refused(f"{LABELS[name]}: give a date as YYYY-MM-DD, not {text!r}.") from None


def _query(values: dict[str, str], own: Mailbox | None) -> Query:
    """The index's query for the form's values; `own`: a user's search, always of their own mail."""
    if values["direction"] not in ("", "in", "out"):
        raise Refused("Direction: choose in, out or either.")
    since, until = _day(values, "since"), _day(values, "until")
    if since and until and since > until:
        raise Refused("Since is after Until: nothing can match.")
    return Query(user=None if own else _address(values, "user"),
                 mailbox=str(own) if own else None,
                 direction=values["direction"] or None, from_=_address(values, "from"),
                 to=_address(values, "to"), subject=values["subject"] or None,
                 words=values["words"] or None,
                 has_attachment=True if values["attachment"] == "yes" else None,
                 since=since, until=until)


def _values(request: web.Request, own: Mailbox | None) -> dict[str, str]:
    values = {name: request.query.get(name, "").strip()[:1000] for name in FIELDS}
    if own is not None:
        values["user"] = ""         # a user's search is of their own mail: the field is not theirs
    return values


def _page_number(text: str | None) -> int:
    try:
        return max(1, min(int(text or 1), 10**9))
    except ValueError:
        return 1


def search_url(base: str, values: dict[str, str], **more: object) -> str:
    """`base` with the search's values (the ones given) and `more` (a page, a format)."""
    pairs = {k: v for k, v in values.items() if v} | {k: str(v) for k, v in more.items()}
    return f"{base}?{urlencode(pairs)}" if pairs else base


@dataclass(frozen=True)
class Hit:
    """One result row: the record and what its headers say."""

    record: Record
    subject: str
    from_: str
    date: str

    @property
    def rcpts_shown(self) -> tuple[str, ...]:
        return self.record.rcpts[:RCPTS_SHOWN]

    @property
    def rcpts_more(self) -> int:
        return max(0, len(self.record.rcpts) - RCPTS_SHOWN)


def _hit(archive: Archive, record: Record) -> Hit:
    try:
        head = headers.split(archive.read(record, HEAD_LIMIT))[0]
    except OSError:                 # its file is missing: `archive verify` says so; still listed
        head = b""
    subject = next(iter(headers.values(head, "Subject")), "")
    sender = next(iter(headers.values(head, "From")), "") or record.sender or "<>"
    return Hit(record, _line(subject), _line(sender), _utc(record.time))


@dataclass(frozen=True)
class Results:
    hits: list[Hit]
    page: int
    more: bool


def _results(hook: ArchiveWeb, query: Query, page: int) -> Results:
    """One page of hits, newest first (blocking: the index, then each message's headers)."""
    assert hook.index is not None and hook.archive is not None
    found = hook.index.search(query, page, PER_PAGE)
    return Results([_hit(hook.archive, r) for r in found.records], page, found.more)


async def _search_page(request: web.Request, template: str, base: str, own: Mailbox | None,
                       status: int = 200, error: str | None = None) -> web.StreamResponse:
    """The search form and one page of what it finds (the newest mail when nothing is asked)."""
    hook = _hook(request)
    if hook.archive is None:
        return render(request, "archive_off.html", off=OFF)
    values = _values(request, own)
    page = _page_number(request.query.get("page"))
    results = Results([], page, False)
    try:
        query = _query(values, own)
        results = await asyncio.to_thread(_results, hook, query, page)
    except Refused as exc:
        status, error = exc.status, str(exc)
    except StorageError as exc:
        event("web.archive_unavailable", logging.ERROR, error=exc)
        status, error = 503, ("The archive's search index cannot be read just now; the relay's log "
                              "says why (`continuity-relay archive reindex` rebuilds it).")
    return await _page(request, template, status, values=values, results=results, error=error,
                       base=base, own=own is not None, search_url=search_url)


# -- one message -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shown:
    """One archived message as its page shows it."""

    record: Record
    date: str
    message: MessageView | None     # None: its file is missing
    header_text: str                # the header block as text, for the panel
    held: bool


def _header_text(data: bytes) -> str:
    head = headers.split(data[:HEAD_LIMIT])[0].decode("utf-8", errors="replace")
    return "".join(c for c in head.replace("\r\n", "\n") if c in "\t\n" or c.isprintable())


def _find(archive: Archive, record_id: str, user: Mailbox | None) -> Record | None:
    """The record `record_id` (blocking); None when there is none, or it is not `user`'s."""
    try:
        record = archive.get(record_id)
    except CorruptEntryError:
        return None
    return record if user is None or _theirs(record, user) else None


async def _exists(request: web.Request, user: Mailbox | None) -> None:
    """404 unless the page's message exists (and, for a user, is theirs)."""
    hook = _hook(request)
    if hook.archive is None or await asyncio.to_thread(
            _find, hook.archive, request.match_info["id"], user) is None:
        raise web.HTTPNotFound()


def _shown(archive: Archive, record_id: str, user: Mailbox | None) -> Shown | None:
    """The message `record_id` as shown (blocking); None when there is none, or not `user`'s."""
    record = _find(archive, record_id, user)
    if record is None:
        return None
    try:
        data = archive.read(record)
    except OSError:
        return Shown(record, _utc(record.time), None, "", Archive.held(record, archive.holds()))
    return Shown(record, _utc(record.time), view(data), _header_text(data),
                 Archive.held(record, archive.holds()))


async def _message_page(request: web.Request, user: Mailbox | None, status: int = 200,
                        error: str | None = None, to: str = "") -> web.StreamResponse:
    hook = _hook(request)
    if hook.archive is None:
        raise web.HTTPNotFound()
    shown = await asyncio.to_thread(_shown, hook.archive, request.match_info["id"], user)
    if shown is None:
        raise web.HTTPNotFound()
    template, done = ("panel/archive_message.html", PANEL_DONE) if user is None else \
        ("mail/archive_message.html", MAIL_DONE)
    return await _page(request, template, status, shown=shown, error=error, to=to,
                       done=None if error else done.get(request.query.get("done", "")))


def _went(done: list[Released]) -> str:
    places = {item.went for item in done}
    if places == {"continuity mailbox"}:
        return "continuity"
    return "primary" if places == {"primary"} else "both"


async def _release(request: web.Request, to: Mailbox | None, by: str) -> list[Released]:
    """Release the page's message (blocking work in a thread); Refused says why it could not."""
    hook, site = _hook(request), site_of(request)
    assert hook.archive is not None and hook.store is not None
    try:
        return await asyncio.to_thread(release, hook.archive, hook.store, request.match_info["id"], by,
                                       site.config.domains, site.directory.is_registered, to)
    except EntryError as exc:
        raise Refused(str(exc).replace("; say --to", ": give an address to release it to"), 409) from None
    except (StorageError, OSError) as exc:
        event("web.archive_release_failed", logging.ERROR, id=request.match_info["id"], error=exc)
        raise Refused("The relay could not store the copy just now, so nothing was released (the "
                      "relay's log says why). Try again in a moment.", 503) from None


# -- the panel --------------------------------------------------------------------------------------

@admin_only
async def panel_search(request: web.Request) -> web.StreamResponse:
    return await _search_page(request, "panel/archive.html", "/panel/archive", None)


@admin_only
async def panel_message(request: web.Request) -> web.StreamResponse:
    return await _message_page(request, None)


@admin_only
async def panel_release(request: web.Request) -> web.StreamResponse:
    """A copy to each recipient of ours, or to the address typed; one audit line a copy."""
    site, record_id = site_of(request), request.match_info["id"]
    admin = account_of(request).email
    typed = form_text(await request.post(), "to").strip()
    await _exists(request, None)
    try:
        to = None
        if typed:
            try:
                to = parse_mailbox(typed)
            except AddressError as exc:
                raise Refused(f"Release to: {typed!r} is not an address ({exc}).") from None
            if to.domain not in site.config.domains:
                raise Refused(f"Release to: {to} is not in a domain this relay serves.")
        done = await _release(request, to, f"{admin} (panel)")
    except Refused as exc:
        return await _message_page(request, None, exc.status, str(exc), typed)
    for item in done:
        event("web.admin_action", admin=admin, action="archive_release", id=record_id, to=item.user,
              went=item.went, queue_id=item.queue_id)
    await site.record_many("admin", admin, [
        ("archive_release", {"id": record_id, "to": item.user, "went": item.went, "queue_id": item.queue_id})
        for item in done])
    return redirect(f"/panel/archive/{record_id}?done={_went(done)}")


def _eml(archive: Archive, record_id: str) -> bytes | None:
    try:
        return archive.read(archive.get(record_id))
    except (CorruptEntryError, OSError):
        return None


def _download_headers(response: web.StreamResponse, filename: str) -> None:
    response.headers["Content-Disposition"] = content_disposition(filename)
    response.headers["Content-Security-Policy"] = DOWNLOAD_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"


@admin_only
async def panel_eml(request: web.Request) -> web.StreamResponse:
    """The message exactly as archived, as `<id>.eml`."""
    hook, record_id = _hook(request), request.match_info["id"]
    if hook.archive is None:
        raise web.HTTPNotFound()
    data = await asyncio.to_thread(_eml, hook.archive, record_id)
    if data is None:
        raise web.HTTPNotFound()
    await audit_admin(request, "archive_download", id=record_id)
    response = web.Response(body=data, content_type="message/rfc822")
    _download_headers(response, f"{record_id}.eml")
    return response


def _everything(index: ArchiveIndex, query: Query) -> list[Record]:
    """Every record the search finds, oldest first, as an mbox reads best (blocking)."""
    found: list[Record] = []
    page = 1
    while True:
        result = index.search(query, page, 500)
        found += result.records
        if not result.more:
            return found[::-1]
        page += 1


def _export_file(hook: ArchiveWeb, query: Query, fmt: str) -> tuple[BinaryIO, int, int]:
    """(a temporary file holding the export, read from its start; messages; bytes) (blocking).
    The file has no name (it goes when closed); EntryError when mbox cannot hold a message."""
    assert hook.archive is not None and hook.index is not None
    records = _everything(hook.index, query)
    out = tempfile.TemporaryFile(prefix="relay-export-")
    try:
        count = export(hook.archive, records, out, fmt)
        size = out.tell()
        out.seek(0)
    except BaseException:
        out.close()
        raise
    return out, count, size


@admin_only
async def panel_export(request: web.Request) -> web.StreamResponse:
    """The search's every message as one download (built in a temporary file, then streamed)."""
    hook = _hook(request)
    if hook.archive is None:
        return render(request, "archive_off.html", off=OFF)
    values = _values(request, None)
    fmt = request.query.get("format", "mbox")
    try:
        if fmt not in FORMATS:
            raise Refused(f"Download as {', '.join(FORMATS)}.")
        query = _query(values, None)
        out, count, size = await asyncio.to_thread(_export_file, hook, query, fmt)
    except Refused as exc:
        return await _search_page(request, "panel/archive.html", "/panel/archive", None, exc.status,
                                  str(exc))
    except EntryError as exc:   # a line starting "From ": mbox cannot keep it byte for byte
        text = str(exc).replace("export it with --format eml-zip", "download a zip of .eml files instead")
        return await _search_page(request, "panel/archive.html", "/panel/archive", None, 409, text)
    except (StorageError, OSError) as exc:     # the index, a message file, the temporary file
        event("web.archive_export_failed", logging.ERROR, error=exc)
        return await _search_page(request, "panel/archive.html", "/panel/archive", None, 503,
                                  "The relay could not build the download just now; its log says why.")
    try:
        await audit_admin(request, "archive_export", format=fmt, messages=count,
                      query=urlencode({k: v for k, v in values.items() if v}))
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        response = web.StreamResponse(headers={"Content-Type": EXPORT_TYPES[fmt]})
        response.content_length = size
        _download_headers(response, f"archive-{stamp}.{EXPORT_SUFFIX[fmt]}")
        await response.prepare(request)
        try:
            while chunk := await asyncio.to_thread(out.read, CHUNK):
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:
            pass                # the browser went away: nothing more to send
        return response
    finally:
        await asyncio.to_thread(out.close)


# -- legal holds --------------------------------------------------------------------------------------

async def _holds_page(request: web.Request, status: int = 200, error: str | None = None,
                      typed: str = "") -> web.StreamResponse:
    hook = _hook(request)
    if hook.archive is None:
        return render(request, "archive_off.html", off=OFF)
    holds = await asyncio.to_thread(hook.archive.holds)
    return render(request, "panel/archive_holds.html", status, holds=holds, error=error, typed=typed,
                  done=None if error else HOLDS_DONE.get(request.query.get("done", "")))


@admin_only
async def holds_page(request: web.Request) -> web.StreamResponse:
    return await _holds_page(request)


def _change_holds(hook: ArchiveWeb, action: str, key: str) -> bool:
    """Add or remove one hold (blocking); False when there was nothing to change. One change at
    a time, so two administrators' changes never undo each other's."""
    assert hook.archive is not None
    with hook.holds_lock:
        holds = hook.archive.holds()
        if (key in holds) == (action == "add"):
            return False
        hook.archive.set_holds(holds + [key] if action == "add" else [h for h in holds if h != key])
        return True


@admin_only
async def change_hold(request: web.Request) -> web.StreamResponse:
    hook, action = _hook(request), request.match_info["action"]
    if hook.archive is None:
        raise web.HTTPNotFound()
    typed = form_text(await request.post(), "who").strip()
    if not typed:
        return await _holds_page(request, 400, "Give an address (alice@example.com) or a domain "
                                 "(@example.com).", typed)
    try:
        key = Archive.hold_key(typed)
    except AddressError as exc:
        return await _holds_page(request, 400, f"{typed!r} is neither an address nor @domain: {exc}.",
                                 typed)
    if not await asyncio.to_thread(_change_holds, hook, action, key):
        if action == "add":
            return redirect("/panel/archive/holds?done=already")
        return await _holds_page(request, 409, f"{key} is not held.", typed)
    await audit_admin(request, f"archive_hold_{action}", who=key)
    return redirect(f"/panel/archive/holds?done={action}")


# -- the webmail ------------------------------------------------------------------------------------

@user_only
async def mail_search(request: web.Request) -> web.StreamResponse:
    return await _search_page(request, "mail/archive.html", "/mail/archive", account_of(request).address)


@user_only
async def mail_message(request: web.Request) -> web.StreamResponse:
    return await _message_page(request, account_of(request).address)


@user_only
async def mail_restore(request: web.Request) -> web.StreamResponse:
    """A copy of one of their own messages to their own INBOX: here during an outage, else on
    their mail server."""
    user, record_id = account_of(request), request.match_info["id"]
    await _exists(request, user.address)        # 404 unless the message is theirs
    try:
        done = await _release(request, user.address, f"{user.email} (webmail)")
    except Refused as exc:
        return await _message_page(request, user.address, exc.status, str(exc))
    for item in done:
        event("webmail.archive_restored", user=user.email, id=record_id, went=item.went,
              queue_id=item.queue_id)
        await site_of(request).record("user", user.email, "archive_restore", id=record_id, went=item.went,
                                      queue_id=item.queue_id)
    return redirect(f"/mail/archive/{record_id}?done={_went(done)}")


def add_routes(app: web.Application) -> None:
    """The panel's and the webmail's archive routes: before mail.py's, so that `/mail/archive`
    is this page and not a folder of that name."""
    r = app.router
    r.add_get("/panel/archive", panel_search, name="panel_archive")
    r.add_get("/mail/archive", mail_search, name="mail_archive")
    if app[ARCHIVE].archive is None:
        return
    # the downloads are audited: a HEAD must not build or record one
    r.add_get("/panel/archive/export", panel_export, name="panel_archive_export", allow_head=False)
    r.add_get("/panel/archive/holds", holds_page, name="panel_archive_holds")
    r.add_post("/panel/archive/holds/{action:add|remove}", change_hold)
    r.add_get(f"/panel/archive/{ID_PATTERN}", panel_message, name="panel_archive_message")
    r.add_get(f"/panel/archive/{ID_PATTERN}/eml", panel_eml, name="panel_archive_eml", allow_head=False)
    r.add_post(f"/panel/archive/{ID_PATTERN}/release", panel_release)
    r.add_get(f"/mail/archive/{ID_PATTERN}", mail_message, name="mail_archive_message")
    r.add_post(f"/mail/archive/{ID_PATTERN}/restore", mail_restore)
