"""The control panel for administrators: domains -> a domain -> its users -> a user.

    GET  /panel                                    every domain: subscription, health, queue
    GET  /panel/domains/{domain}                   one domain: the same in full, its planned
                                                   outage and windows (relay/web/planned.py
                                                   takes their forms), and its users
    GET  /panel/domains/{domain}/add               form: register a user
    POST /panel/domains/{domain}/add
    GET  /panel/domains/{domain}/users/{local}     one user: allocate a password, (de)activate,
                                                   the alternate address outage notices go to
    POST /panel/domains/{domain}/users/{local}     save
    POST /panel/domains/{domain}/users/{local}/generate    allocate a generated password
    GET  /panel/import                             form: import users from a CSV file
    POST /panel/import                             the import, with a report per refused line
    GET  /panel/domains/{domain}/queue             the replay queue, paged, filterable by state
    POST /panel/domains/{domain}/queue/{id}/{action}   hold, release, retry or delete (audited)

Every change goes through `Directory` (the passwd-file is rewritten at once, so Dovecot, the
submission port and the webmail take the new password) and then into the audit log. Refused
input shows the form again with what was typed (passwords excepted) and says why.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from relay.addresses import AddressError, parse_mailbox
from relay.config import Config, Domain
from relay.delivery import planned
from relay.directory import Directory, User, check_alternate
from relay.errors import DirectoryError, EntryError
from relay.log import event
from relay.storage import spool
from relay.storage.state import DomainStatus, domain_status
from relay.web import password
from relay.web.login import account_of, admin_only, audit_admin
from relay.web.page import form_text, redirect, render
from relay.web.site import site_of

DONE = {"saved": "Saved.", "unchanged": "Nothing to change.", "added": "User registered.",
        "outage_start": "Planned outage started: mail is kept, nothing goes to the primary.",
        "outage_end": "Planned outage ended: what was kept is being replayed.",
        "outage_schedule": "Window scheduled.", "outage_unschedule": "Window removed."}


@dataclass(frozen=True)
class DomainView:
    """What the panel shows about one domain: its configuration and its status."""

    domain: Domain
    status: DomainStatus

    @property
    def name(self) -> str:
        return self.domain.name

    def __getattr__(self, name: str) -> object:       # health, subscribed, queue, oldest
        return getattr(self.status, name)


def domain_view(config: Config, name: str) -> DomainView:
    """One domain's configuration and status (blocking: a few directory listings)."""
    return DomainView(config.domains[name], domain_status(config, name))


def user_url(user: User) -> str:
    return f"/panel/domains/{user.address.domain}/users/{quote(user.address.local, safe='')}"


def domain_name(request: web.Request) -> str:
    """The configured domain the URL names (404 otherwise)."""
    name = request.match_info["domain"]
    if name not in site_of(request).config.domains:
        raise web.HTTPNotFound()
    return name


async def _user(request: web.Request) -> User:
    domain = domain_name(request)
    try:
        address = parse_mailbox(f"{request.match_info['local']}@{domain}")
    except AddressError:
        raise web.HTTPNotFound() from None
    user = await asyncio.to_thread(site_of(request).directory.get, address)
    if user is None:
        raise web.HTTPNotFound()
    return user


# -- domains -------------------------------------------------------------------------------------

@admin_only
async def domains(request: web.Request) -> web.StreamResponse:
    config = site_of(request).config
    views = await asyncio.to_thread(lambda: [domain_view(config, name) for name in sorted(config.domains)])
    return render(request, "panel/domains.html", domains=views)


@admin_only
async def domain_page(request: web.Request) -> web.StreamResponse:
    return await domain_view_page(request)


async def domain_view_page(request: web.Request, status: int = 200,
                           error: str | None = None) -> web.StreamResponse:
    """The domain page; with `error` (a refused change, relay/web/planned.py) it says why."""
    site, name = site_of(request), domain_name(request)
    view, users, windows = await asyncio.to_thread(
        lambda: (domain_view(site.config, name), site.directory.list(name),
                 planned.windows(site.config, name)))
    return render(request, "panel/domain.html", status, view=view, users=users, user_url=user_url,
                  windows=[w for w in windows if w.end > time.time()],
                  configured=set(site.config.domains[name].planned), error=error,
                  done=None if error else DONE.get(request.query.get("done", "")))


# -- a domain's replay queue, as `continuity-relay queue` shows and moves it ----------------------

QUEUE_PAGE = 50
QUEUE_DONE = {"hold": "Set aside: no runner touches it until released.",
              "release": "Released: waiting again, due now.", "retry": "Due now: it is tried again.",
              "delete": "Deleted from the queue (the user's continuity copy stays)."}


@admin_only
async def queue_page(request: web.Request) -> web.StreamResponse:
    return await _queue_view(request)


async def _queue_view(request: web.Request, status: int = 200,
                      error: str | None = None) -> web.StreamResponse:
    site, name = site_of(request), domain_name(request)
    state = request.query.get("state") or None
    if state not in (None, *spool.SHOWN_STATES):
        state, status, error = None, 400, "Choose one of the states listed."
    try:
        page = max(1, int(request.query.get("page", "1")))
    except ValueError:
        page = 1
    selected = spool.queues(site.config.storage.spool, [name], None, name)
    rows = await asyncio.to_thread(lambda: list(spool.rows(selected, state)))
    pages = max(1, -(-len(rows) // QUEUE_PAGE))
    shown = rows[(page - 1) * QUEUE_PAGE: page * QUEUE_PAGE]
    return render(request, "panel/queue.html", status, domain=name, rows=shown, total=len(rows),
                  state=state, states=spool.SHOWN_STATES, page=min(page, pages), pages=pages,
                  error=error, done=None if error else QUEUE_DONE.get(request.query.get("done", "")))


@admin_only
async def queue_action(request: web.Request) -> web.StreamResponse:
    """hold, release, retry or delete one entry of this domain's replay queue or of its users'
    outbound mail (audited). A delete needs its confirmation box ticked; the user's Maildir
    copy always stays."""
    site, name = site_of(request), domain_name(request)
    entry, action = request.match_info["entry"], request.match_info["action"]
    form = await request.post()
    if action == "delete" and form_text(form, "confirm") != "yes":
        return await _queue_view(request, 400, "Tick the box to confirm the delete.")
    selected = spool.queues(site.config.storage.spool, [name], None, name)
    try:
        was = await asyncio.to_thread(lambda: getattr(spool.find(selected, entry)[2], action)(entry))
    except EntryError as exc:
        return await _queue_view(request, 409, str(exc))
    await audit_admin(request, f"queue_{action}", domain=name, id=entry, was=was)
    return redirect(f"/panel/domains/{name}/queue?done={action}")


# -- one user ------------------------------------------------------------------------------------

def _user_form(request: web.Request, user: User, status: int = 200, error: str | None = None,
               generated: str | None = None, alternate: str | None = None) -> web.Response:
    domain = site_of(request).config.domains[user.address.domain]
    return render(request, "panel/user.html", status, user=user, url=user_url(user), error=error,
                  generated=generated, ldap=domain.ldap is not None,
                  alternate=user.alternate if alternate is None else alternate,
                  done=DONE.get(request.query.get("done", "")))


@admin_only
async def user_page(request: web.Request) -> web.StreamResponse:
    return _user_form(request, await _user(request))


@admin_only
async def save_user(request: web.Request) -> web.StreamResponse:
    """Allocate the password typed twice (if any), set the state and the alternate address
    (each if it changed)."""
    site, user = site_of(request), await _user(request)
    form = await request.post()
    new, repeat, state = form_text(form, "password"), form_text(form, "repeat"), form_text(form, "state")
    alternate = form_text(form, "alternate").strip() if "alternate" in form else None
    if (new or repeat) and (problem := password.problem(new, repeat)):
        return _user_form(request, user, 400, error=problem)
    if state not in ("", "active", "inactive"):
        return _user_form(request, user, 400, error="Choose active or inactive.")
    if alternate:
        try:
            check_alternate(user.address, alternate)     # refused before anything changes
        except DirectoryError as exc:
            return _user_form(request, user, 400, error=str(exc), alternate=alternate)
    changed = False
    try:
        if new:
            user = await asyncio.to_thread(site.directory.set_password, user.email, new)
            await audit_admin(request, "set_password", user=user.email)
            changed = True
        if state and (state == "active") != user.active:
            user = await asyncio.to_thread(site.directory.set_active, user.email, state == "active")
            if not user.active:     # for good: re-activating later revives no old cookie
                await asyncio.to_thread(site.sessions.revoked.end_account, user.email)
            await audit_admin(request, "activate" if user.active else "deactivate", user=user.email)
            changed = True
        if alternate is not None and alternate.lower() != user.alternate:
            user = await asyncio.to_thread(site.directory.set_alternate, user.email, alternate)
            await audit_admin(request, "set_alternate", user=user.email, alternate=user.alternate or "-")
            changed = True
    except DirectoryError as exc:
        return _user_form(request, user, 400, error=str(exc))
    return redirect(f"{user_url(user)}?done={'saved' if changed else 'unchanged'}")


@admin_only
async def generate_password(request: web.Request) -> web.StreamResponse:
    """Allocate a generated password and show it once (pages are never cached)."""
    site, user = site_of(request), await _user(request)
    new = password.generate()
    try:
        user = await asyncio.to_thread(site.directory.set_password, user.email, new)
    except DirectoryError as exc:
        return _user_form(request, user, 400, error=str(exc))
    await audit_admin(request, "set_password", user=user.email, generated="yes")
    return _user_form(request, user, generated=new)


# -- adding users --------------------------------------------------------------------------------

def _add_form(request: web.Request, domain: str, status: int = 200, error: str | None = None,
              **values: str) -> web.Response:
    values = {"email": "", "name": "", "state": "active", **values}
    return render(request, "panel/add_user.html", status, domain=domain, error=error, values=values)


@admin_only
async def add_user_form(request: web.Request) -> web.StreamResponse:
    return _add_form(request, domain_name(request))


@admin_only
async def add_user(request: web.Request) -> web.StreamResponse:
    site, domain = site_of(request), domain_name(request)
    form = await request.post()
    values = {"email": form_text(form, "email").strip(), "name": form_text(form, "name").strip(),
              "state": form_text(form, "state") or "active"}
    new, repeat = form_text(form, "password"), form_text(form, "repeat")
    if not values["email"]:
        return _add_form(request, domain, 400, "Give the user's address.", **values)
    try:
        address = parse_mailbox(values["email"] if "@" in values["email"] else f"{values['email']}@{domain}")
    except AddressError as exc:
        return _add_form(request, domain, 400, f"Not a usable address: {exc}.", **values)
    if address.domain != domain:
        return _add_form(request, domain, 400, f"The address must be in {domain}.", **values)
    if (new or repeat) and (problem := password.problem(new, repeat)):
        return _add_form(request, domain, 400, problem, **values)
    try:
        user = await asyncio.to_thread(site.directory.add, str(address), values["name"], new or None)
    except DirectoryError as exc:
        return _add_form(request, domain, 400, str(exc), **values)
    await audit_admin(request, "add_user", user=user.email, can_log_in="yes" if new else "no")
    if values["state"] == "inactive":
        user = await asyncio.to_thread(site.directory.set_active, user.email, False)
        await audit_admin(request, "deactivate", user=user.email)
    return redirect(f"{user_url(user)}?done=added")


# -- importing users -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ImportReport:
    added: list[User]
    refused: list[tuple[int, str]]      # (line number, why)


def _strip_path(message: str, path: Path) -> tuple[int, str]:
    """`/tmp/x/upload.csv:3: why` -> (3, "why")."""
    rest = message.removeprefix(f"{path}:")
    number, _, why = rest.partition(": ")
    return (int(number), why) if number.isdigit() else (0, rest)


def _import(directory: Directory, upload: web.FileField) -> ImportReport:
    """Copy the upload to a private temporary file and import it (blocking)."""
    with tempfile.TemporaryDirectory(prefix="relay-import-") as folder:
        path = Path(folder) / "upload.csv"
        with open(path, "wb") as target:
            shutil.copyfileobj(upload.file, target)
        try:
            added, problems = directory.import_csv(path)
        except DirectoryError as exc:
            number, why = _strip_path(str(exc), path)
            raise DirectoryError(f"line {number}: {why}" if number else why) from None
        return ImportReport(added, [_strip_path(p, path) for p in problems])


def _import_form(request: web.Request, status: int = 200, error: str | None = None,
                 report: ImportReport | None = None) -> web.Response:
    return render(request, "panel/import.html", status, error=error, report=report, user_url=user_url,
                  domains=sorted(site_of(request).config.domains))


@admin_only
async def import_form(request: web.Request) -> web.StreamResponse:
    return _import_form(request)


@admin_only
async def import_users(request: web.Request) -> web.StreamResponse:
    site = site_of(request)
    upload = (await request.post()).get("file")
    if not isinstance(upload, web.FileField) or not upload.filename:
        return _import_form(request, 400, "Choose a CSV file to import.")
    try:
        report = await asyncio.to_thread(_import, site.directory, upload)
    except DirectoryError as exc:
        return _import_form(request, 400, f"Nothing was imported: {exc}")
    admin = account_of(request).email
    event("web.admin_action", admin=admin, action="import", added=len(report.added),
          refused=len(report.refused))
    await site.record_many("admin", admin, [
        ("import", {"file": upload.filename, "added": len(report.added), "refused": len(report.refused)}),
        *(("add_user", {"user": user.email, "source": "import"}) for user in report.added)])
    return _import_form(request, report=report)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/panel", domains, name="panel")
    r.add_get("/panel/domains/{domain}", domain_page, name="panel_domain")
    r.add_get("/panel/domains/{domain}/add", add_user_form, name="panel_add_user")
    r.add_post("/panel/domains/{domain}/add", add_user)
    r.add_get("/panel/domains/{domain}/users/{local}", user_page, name="panel_user")
    r.add_post("/panel/domains/{domain}/users/{local}", save_user)
    r.add_post("/panel/domains/{domain}/users/{local}/generate", generate_password, name="panel_generate")
    r.add_get("/panel/domains/{domain}/queue", queue_page, name="panel_queue")
    r.add_post("/panel/domains/{domain}/queue/{entry}/{action:hold|release|retry|delete}", queue_action)
    r.add_get("/panel/import", import_form, name="panel_import")
    r.add_post("/panel/import", import_users)
