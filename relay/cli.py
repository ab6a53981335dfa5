"""The `continuity-relay` command: argument parsing, one function per command, no logic of its own.

Exit status: 0 success, 1 failure, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import getpass
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from relay import __version__, headers
from relay.addresses import AddressError, Mailbox, parse_mailbox
from relay.admins import Admins
from relay.config import Config, load, parse_duration, parse_time, reason_text
from relay.delivery import planned, readiness
from relay.directory import Directory
from relay.errors import ConfigErrors, DirectoryError, EntryError, RelayError, StorageError, UsageError
from relay.log import event, formatter, queued, setup, stop
from relay.storage import serve_lock, spool
from relay.storage.archive import Archive, Record
from relay.storage.archive_export import FORMATS, export
from relay.storage.archive_index import ArchiveIndex, Query
from relay.storage.continuity import replay_queue_path
from relay.storage.durable import Owner
from relay.storage.queue import Queue, waiting_by_user
from relay.storage.release import release
from relay.storage.state import domain_status

# `relay.app` and `relay.web` bring in aiohttp and every listener (about 0.7 s of CPU here, more
# than `status` itself costs with 100,000 entries): only the commands that use them import them.


def _config(args: argparse.Namespace) -> Config:
    """The configuration, and the log set up as it says (`log_level`, `log.format`): every
    command logs to stderr, as serve does; `main` writes what is queued before it returns."""
    config = load(args.config)
    setup(config.log_level, config.log.format)
    return config


def _audited(config: Config, action: str, **fields: object) -> None:
    """An administrator's change made from the command line: one log line (`cli.admin_action`,
    as the panel's `web.admin_action`) and one audit line, naming the Unix user. Never a
    password (the audit log refuses a field named so)."""
    from relay.web.audit import AuditLog

    who = getpass.getuser()
    event("cli.admin_action", admin=who, action=action, **fields)
    AuditLog(config.audit_log).record("cli", who, action, **fields)


def _password(args: argparse.Namespace) -> str | None:
    if not getattr(args, "password_stdin", False):
        return None
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise UsageError("--password-stdin: no password on standard input")
    return line


def cmd_serve(args: argparse.Namespace) -> int:
    from relay import app

    asyncio.run(app.serve(_config(args)))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = _config(args)
    print(f"{config.file}: OK, {len(config.domains)} domain(s)")
    if config.outbound.smarthost is None:
        print(f"{config.file}: outbound.smarthost: not set, so sending is disabled (submission "
              f"answers 451, Outbox messages wait, notices to other domains wait in the spool)")
    elif config.outbound.smarthost.username and config.outbound.smarthost.starttls != "required":
        print(f"{config.file}: outbound.smarthost.starttls: {config.outbound.smarthost.starttls} with a "
              f"username: the relay still never sends the password without TLS, so a smarthost "
              f"without STARTTLS gets no mail; say `required` to make that plain")
    return 0


def cmd_users_add(args: argparse.Namespace) -> int:
    config = _config(args)
    user = Directory(config).add(args.email, args.name or "", _password(args))
    _audited(config, "add_user", user=user.email, can_log_in="yes" if user.password_hash else "no")
    print(f"added {user.email}" + ("" if user.password_hash else " (no password: cannot log in)"))
    return 0


def cmd_users_import(args: argparse.Namespace) -> int:
    config = _config(args)
    added, problems = Directory(config).import_csv(Path(args.file))
    _audited(config, "import", file=args.file, added=len(added), refused=len(problems))
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"imported {len(added)} user(s), {len(problems)} line(s) refused")
    return 1 if problems else 0


def cmd_users_passwd(args: argparse.Namespace) -> int:
    password = _password(args)
    if password is None:
        raise UsageError("users passwd reads the new password with --password-stdin")
    config = _config(args)
    user = Directory(config).set_password(args.email, password)
    _audited(config, "set_password", user=user.email)
    print(f"password changed for {user.email}")
    return 0


def cmd_users_set(args: argparse.Namespace) -> int:
    """Change a user's settings: today the alternate address outage notices go to."""
    if args.alternate is None:
        raise UsageError("users set: say what to change (--alternate ADDRESS, or '' to clear it)")
    config = _config(args)
    user = Directory(config).set_alternate(args.email, args.alternate)
    _audited(config, "set_alternate", user=user.email, alternate=user.alternate or "-")
    print(f"{user.email}: alternate " + (user.alternate or "cleared"))
    return 0


def cmd_users_activate(args: argparse.Namespace) -> int:
    config = _config(args)
    user = Directory(config).set_active(args.email, True)
    _audited(config, "activate", user=user.email)
    print(f"activated {user.email}")
    return 0


def cmd_users_deactivate(args: argparse.Namespace) -> int:
    config = _config(args)
    from relay.web.revoked import Revoked

    user = Directory(config).set_active(args.email, False)
    Revoked(config.web.revoked_file, config.web.session_lifetime).end_account(user.email)
    _audited(config, "deactivate", user=user.email)
    print(f"deactivated {user.email} (and ended their web sessions)")
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    for user in Directory(_config(args)).list(args.domain):
        state = "active" if user.active else "inactive"
        password = "password" if user.password_hash else "no-password"
        print(f"{user.email}\t{state}\t{password}\t{user.name}")
    return 0


def cmd_admins_add(args: argparse.Namespace) -> int:
    password = _password(args)
    if password is None:
        raise UsageError("admins add reads the password with --password-stdin")
    config = _config(args)
    admin = Admins(config).add(args.email, password)
    _audited(config, "add_admin", user=admin.email)
    print(f"added administrator {admin.email}")
    return 0


def cmd_admins_passwd(args: argparse.Namespace) -> int:
    password = _password(args)
    if password is None:
        raise UsageError("admins passwd reads the new password with --password-stdin")
    config = _config(args)
    admin = Admins(config).set_password(args.email, password)
    _audited(config, "set_admin_password", user=admin.email)
    print(f"password changed for administrator {admin.email}")
    return 0


def cmd_admins_list(args: argparse.Namespace) -> int:
    for admin in Admins(_config(args)).list():
        print(f"{admin.email}\t{'active' if admin.can_log_in else 'inactive'}")
    return 0


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def cmd_status(args: argparse.Namespace) -> int:
    config = _config(args)
    print(f"{'domain':28} {'state':9} {'since':19} {'waiting':>7} {'active':>6} {'failed':>6} "
          f"{'held':>5} {'oldest':>6}  continuity")
    for name, domain in sorted(config.domains.items()):
        status = domain_status(config, name)
        state = status.health
        since = (dt.datetime.fromtimestamp(state.since).strftime("%Y-%m-%d %H:%M:%S")
                 if state.since else "-")
        counts = [status.queue[s] for s in ("waiting", "active", "failed", "hold")]
        oldest = status.oldest
        sub = domain.continuity
        if sub is None:
            cover = "none"
        else:
            cover = f"{'active' if status.subscribed else 'inactive'} {sub.since}..{sub.until}"
        print(f"{name:28} {state.state:9} {since:19} {counts[0]:>7} {counts[1]:>6} {counts[2]:>6} "
              f"{counts[3]:>5} {_age(oldest) if oldest is not None else '-':>6}  {cover}")
        if state.planned:
            print(f"  planned outage until {_local(state.until)}: {_shown(state.reason)}")
        for window in planned.windows(config, name):
            if window.end > time.time():
                print(f"  planned window {_local(window.start)} .. {_local(window.end)}"
                      f"{': ' + _shown(window.reason) if window.reason else ''}")
    return 0


def _local(stamp: float | None) -> str:
    if stamp is None:
        return "outage end"
    return dt.datetime.fromtimestamp(stamp).astimezone().strftime("%Y-%m-%d %H:%M %z")


# -- planned outages ---------------------------------------------------------------------------------

def _until(text: str | None) -> float | None:
    """--until: a time (`2026-12-05 20:00`, local unless it says otherwise) or a duration from
    now (`2h`, `90m`)."""
    if text is None:
        return None
    try:
        return time.time() + parse_duration(text)
    except ValueError:
        pass
    try:
        return parse_time(text)
    except ValueError as exc:
        raise UsageError(f"--until: {exc}; or a duration like 2h") from None


def _planned_domain(config: Config, name: str) -> str:
    if name not in config.domains:
        raise UsageError(f"--domain {name}: not a configured domain")
    return name


def cmd_outage_start(args: argparse.Namespace) -> int:
    config = _config(args)
    domain = _planned_domain(config, args.domain)
    try:
        reason = reason_text(args.reason or "")
    except ValueError as exc:
        raise UsageError(f"--reason: {exc}") from None
    who = getpass.getuser()
    state = planned.start(config, domain, _until(args.until), reason, f"{who} (command line)")
    _audited(config, "outage_start", domain=domain, until=_local(state.until), reason=state.reason)
    print(f"{domain}: planned outage until {_local(state.until)}; mail is kept, nothing goes to "
          f"the primary (a running serve takes it up within a second)")
    return 0


def cmd_readiness(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.domain:
        _planned_domain(config, args.domain)
    checks = asyncio.run(readiness.report(config, args.domain))
    for check in checks:
        if args.json:
            print(json.dumps(dataclasses.asdict(check)))
        else:
            name = f"{check.domain} {check.name}" if check.domain else check.name
            print(f"{name:36} {check.result:4}  {check.detail}")
    return 1 if readiness.failed(checks) else 0


def cmd_drill(args: argparse.Namespace) -> int:
    config = _config(args)
    domain = _planned_domain(config, args.domain)
    user = _mailbox(args.user if "@" in args.user else f"{args.user}@{domain}")
    if user.domain != domain:
        raise UsageError(f"--user {args.user}: not in {domain}")
    if args.password_file:
        try:
            password = readiness.read_password(Path(args.password_file))
        except DirectoryError as exc:
            raise UsageError(f"--password-file: {exc}") from None
    else:
        password = _password(args)
    if not password:
        raise UsageError("the drill logs in as the user: --password-stdin or --password-file")
    from relay import drill  # the service's code: only the commands that run it import it

    steps = asyncio.run(drill.run(config, user, password))
    for n, step in enumerate(steps, 1):
        result = {True: "pass", False: "fail", None: "skip"}[step.passed]
        print(f"{n}. {step.name:11} {result}  {step.seconds:6.2f}s  {step.detail}")
    passed = all(step.passed for step in steps)
    print(f"drill {'passed' if passed else 'FAILED'} for {user}")
    return 0 if passed else 1


def cmd_outage_end(args: argparse.Namespace) -> int:
    config = _config(args)
    domain = _planned_domain(config, args.domain)
    who = getpass.getuser()
    planned.end(config, domain, f"{who} (command line)")
    _audited(config, "outage_end", domain=domain)
    print(f"{domain}: planned outage ended; a running serve replays what was kept")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.domain and args.domain not in config.domains:
        raise UsageError(f"--domain {args.domain}: not a configured domain")
    names = [args.domain] if args.domain else sorted(config.domains)
    if args.dry_run:
        for name in names:
            queue = Queue(replay_queue_path(config.storage.spool, name))
            oldest = queue.oldest_age("waiting")
            print(f"{name}: {queue.count('waiting')} waiting for {len(waiting_by_user(queue))} user(s), "
                  f"oldest {_age(oldest) if oldest is not None else '-'}; nothing sent (--dry-run)")
        return 0
    from relay import app

    lock = app.claim_spool(config, names)
    if lock is None:
        print(f"{config.storage.spool / serve_lock.NAME}: a serve is running: what it has in "
              f"active/ is in flight and left to it", file=sys.stderr)
    try:
        return asyncio.run(_replay(config, names))
    finally:
        if lock is not None:
            lock.release()


async def _replay(config: Config, names: list[str]) -> int:
    from relay import app

    status = 0
    for name in names:
        if (state := domain_status(config, name).health).planned:
            print(f"{name}: in a planned outage until {_local(state.until)}: nothing sent "
                  f"(`continuity-relay outage end --domain {name}` first)")
            status = 1
            continue
        waiting = Queue(replay_queue_path(config.storage.spool, name)).count("waiting")
        with (tqdm(total=waiting, desc=name, unit="msg", file=sys.stderr, smoothing=0.1) as bar,
              _above_the_bar()):
            result = await app.replay_once(config, name, bar.update)
        left = Queue(replay_queue_path(config.storage.spool, name)).count("waiting")
        stopped = f"; stopped by the primary: {result.fault}" if result.fault else ""
        print(f"{name}: {result.delivered} delivered, {result.failed} refused (sender notified), "
              f"{result.held} set aside, {left} still waiting{stopped}")
        status = 1 if result.fault or left else status
    return status


@contextlib.contextmanager
def _above_the_bar() -> Iterator[None]:
    """Log lines go above the progress bar (tqdm's handler, in the format set up) and, for the
    while, not also to the stderr writer: each line once."""
    relay = logging.getLogger("relay")
    with logging_redirect_tqdm(loggers=[relay]):
        bar = relay.handlers[-1]
        bar.setFormatter(formatter())
        with queued(bar) as through_a_queue:    # worker threads never wait for the bar
            relay.handlers[-1] = through_a_queue
            relay.propagate = False
            try:
                yield
            finally:
                relay.propagate = True


# -- queue management, as Postfix's postqueue and postsuper -------------------------------------

def _selection(config: Config, args: argparse.Namespace) -> list:
    domain = getattr(args, "domain", None)
    if domain and domain not in config.domains:
        raise UsageError(f"--domain {domain}: not a configured domain")
    return spool.queues(config.storage.spool, config.domains, getattr(args, "queue", None), domain)


def cmd_queue_list(args: argparse.Namespace) -> int:
    config = _config(args)
    found = list(spool.rows(_selection(config, args), args.state))
    if args.json:
        for row in found:
            print(json.dumps(dataclasses.asdict(row), ensure_ascii=False))
        return 0
    print(f"{'id':32} {'queue':8} {'domain':20} {'state':8} {'size':>8} {'age':>6} {'tries':>5}  "
          f"sender -> recipient; last error")
    for row in found:
        print(f"{row.id:32} {row.queue:8} {row.domain or '-':20} {row.state:8} {row.size:>8} "
              f"{_age(row.age):>6} {row.attempts:>5}  {_shown(row.sender)} -> {_shown(row.recipient)}"
              + (f"; {_shown(row.last_error)}" if row.last_error else ""))
    print(f"{len(found)} entr{'y' if len(found) == 1 else 'ies'}")
    return 0


def cmd_queue_show(args: argparse.Namespace) -> int:
    config = _config(args)
    name, domain, queue, state = spool.find(_selection(config, args), args.id)
    envelope, data = queue.read(args.id, state)
    print(f"id: {args.id}\nqueue: {name}\ndomain: {domain or '-'}\nstate: {state}")
    for key, value in dataclasses.asdict(envelope).items():
        if key != "skip":
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            print(f"{key}: {_shown(text)}")
    print()
    shown = data if args.body else headers.split(data)[0]
    for line in shown.decode("utf-8", "replace").splitlines():   # no terminal escapes from mail
        print(_shown(line, limit=100_000))
    return 0


def _each(args: argparse.Namespace, action: str) -> int:
    """hold / release / retry / delete on the ids given, or on every entry of --domain."""
    config = _config(args)
    selected = _selection(config, args)
    targets = [spool.find(selected, entry)[2:] + (entry,) for entry in args.ids]
    if getattr(args, "domain", None) and not args.ids:
        targets = [(queue, row.state, row.id) for name, d, queue in selected if name == "replay"
                   for row in spool.rows([(name, d, queue)]) if row.state != "active"]
    if not targets:
        raise UsageError(f"queue {action}: name entry ids, or --domain")
    if action == "delete" and not args.yes:
        answer = input(f"delete {len(targets)} entr{'y' if len(targets) == 1 else 'ies'} for good? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    failed = 0
    for queue, _state, entry in targets:
        try:
            was = getattr(queue, action)(entry)
        except EntryError as exc:
            print(f"continuity-relay: {exc}", file=sys.stderr)
            failed += 1
            continue
        _audited(config, f"queue_{action}", id=entry, was=was)
        print(f"{entry}: {action} (was {was})")
    return 1 if failed else 0


def cmd_queue_hold(args: argparse.Namespace) -> int:
    return _each(args, "hold")


def cmd_queue_release(args: argparse.Namespace) -> int:
    return _each(args, "release")


def cmd_queue_retry(args: argparse.Namespace) -> int:
    return _each(args, "retry")


def cmd_queue_delete(args: argparse.Namespace) -> int:
    return _each(args, "delete")


def cmd_queue_flush(args: argparse.Namespace) -> int:
    """Like `postqueue -f`: every deferred entry is due now, and the replay queues are swept."""
    config = _config(args)
    selected = _selection(config, args)
    for name, domain, queue in selected:
        for row in spool.rows([(name, domain, queue)], "deferred"):
            try:
                queue.retry(row.id)
            except EntryError:
                continue          # taken by a runner meanwhile
    names = [domain for name, domain, _queue in selected if name == "replay"]
    _audited(config, "queue_flush", domain=getattr(args, "domain", None) or "all")
    return asyncio.run(_replay(config, names)) if names else 0


def _shown(text: str, limit: int = 200) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


# -- the archive ------------------------------------------------------------------------------------

def _archive(config: Config) -> Archive:
    if config.storage.archive is None:
        raise UsageError("storage.archive is not set: the archive is off")
    return Archive(config.storage.archive, config.archive.days, Owner.named(config.storage.owner))


def cmd_archive_release(args: argparse.Namespace) -> int:
    """Each id to its recipients (or --to), the primary or the continuity mailbox by health."""
    from relay import app

    config = _config(args)
    archive, store = _archive(config), app.build_store(config)
    to = _mailbox(args.to) if args.to else None
    who = getpass.getuser()
    status = 0
    for record_id in args.ids:
        try:
            done = release(archive, store, record_id, f"{who} (command line)", config.domains,
                           Directory(config).is_registered, to)
        except EntryError as exc:
            print(f"continuity-relay: {exc}", file=sys.stderr)
            status = 1
            continue
        for item in done:
            _audited(config, "archive_release", id=record_id, to=item.user, went=item.went,
                     queue_id=item.queue_id)
            print(f"{record_id}: released to {item.user}, {item.went} (queue id {item.queue_id})")
    return status


def cmd_archive_hold(args: argparse.Namespace) -> int:
    config = _config(args)
    archive = _archive(config)
    holds = archive.holds()
    if args.action == "list":
        for hold in holds:
            print(hold)
        return 0
    if not args.who:
        raise UsageError(f"archive hold {args.action}: name an address or @domain")
    wanted = [_hold_key(w) for w in args.who]
    changed = sorted(set(holds) | set(wanted)) if args.action == "add" else \
        [h for h in holds if h not in wanted]
    archive.set_holds(changed)
    _audited(config, f"archive_hold_{args.action}", who=",".join(wanted))
    return 0


def _hold_key(text: str) -> str:
    try:
        return Archive.hold_key(text)
    except AddressError as exc:
        raise UsageError(f"{text!r}: {exc}") from None


def _mailbox(text: str) -> Mailbox:
    try:
        return parse_mailbox(text)
    except AddressError as exc:
        raise UsageError(f"{text!r}: {exc}") from None


def cmd_archive_verify(args: argparse.Namespace) -> int:
    """Every problem the day chains and message hashes show; exit 1 when there is any."""
    problems = _archive(_config(args)).verify(args.since)
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s)" if problems else "the archive verifies: no problem found")
    return 1 if problems else 0


def cmd_archive_search(args: argparse.Namespace) -> int:
    """Every hit, newest first, one line each (or one JSON object a line): no cap."""
    archive = _archive(_config(args))
    index = ArchiveIndex(archive)
    hits = 0
    try:
        for record in _hits(index, _query(args)):
            _print_hit(archive, record, args.json)
            hits += 1
    finally:
        index.close()
    if not args.json:
        print(f"{hits} message(s)", file=sys.stderr)
    return 0


def _query(args: argparse.Namespace) -> Query:
    return Query(user=_address_arg(args.user), direction=args.direction, from_=_address_arg(args.sender),
                 to=_address_arg(args.to), subject=args.subject, words=" ".join(args.words) or None,
                 has_attachment=True if args.attachment else None,
                 since=dt.date.fromisoformat(args.since) if args.since else None,
                 until=dt.date.fromisoformat(args.until) if args.until else None)


def _hits(index: ArchiveIndex, query: Query) -> Iterator[Record]:
    """Every record the query finds, newest first, a page at a time: no cap."""
    page = 1
    while True:
        found = index.search(query, page)
        yield from found.records
        if not found.more:
            return
        page += 1


def _address_arg(text: str | None) -> str | None:
    return str(_mailbox(text)) if text else None


def _print_hit(archive: Archive, record: Record, as_json: bool) -> None:
    try:
        head = headers.split(archive.read(record))[0]
    except OSError:
        head = b""
    subject = _decoded(headers.values(head + b"\r\n", "Subject"))
    sender = ", ".join(headers.addresses(head + b"\r\n", "From"))
    date = dt.datetime.fromtimestamp(record.time, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    if as_json:
        print(json.dumps({"id": record.id, "date": date, "direction": record.direction,
                          "from": sender, "to": list(record.rcpts), "subject": subject,
                          "sender": record.sender, "kind": record.kind, "size": record.size}))
    else:
        print(f"{record.id:16} {date} {record.direction:3} {sender or record.sender or '<>'} -> "
              f"{', '.join(record.rcpts)}  {subject}")


def _decoded(values: list[str]) -> str:
    import email.header
    try:
        return str(email.header.make_header(email.header.decode_header(values[0]))) if values else ""
    except (ValueError, LookupError):
        return values[0]


def cmd_archive_reindex(args: argparse.Namespace) -> int:
    config = _config(args)
    index = ArchiveIndex(_archive(config))
    try:
        count = index.reindex()
        _audited(config, "archive_reindex", messages=count)
        print(f"{count} message(s) indexed")
    finally:
        index.close()
    return 0


def cmd_archive_export(args: argparse.Namespace) -> int:
    """What `archive search` would list (everything without a query), oldest first, to an mbox
    or a zip of .eml, streamed through a temporary file."""
    archive = _archive(_config(args))
    index = ArchiveIndex(archive)
    try:
        chosen = list(reversed(list(_hits(index, _query(args)))))
    finally:
        index.close()
    target = Path(args.output)
    tmp = target.with_name(f".{target.name}.part")
    with open(tmp, "wb") as out, tqdm(total=len(chosen), unit="msg", file=sys.stderr,
                                       disable=not sys.stderr.isatty()) as bar:
        try:
            count = export(archive, chosen, out, args.format, bar.update)
        except EntryError:
            tmp.unlink(missing_ok=True)
            raise
    tmp.replace(target)
    print(f"{count} message(s) written to {target}")
    return 0


def _archive_commands(commands, command) -> None:
    archive = commands.add_parser("archive", help="the rolling archive: release, hold, verify"
                                  ).add_subparsers(dest="archive_command", required=True)
    rel = command(archive, "release", cmd_archive_release, "send archived messages again: to the "
                  "primary, or during an outage to the continuity mailbox")
    rel.add_argument("ids", nargs="+", metavar="ID")
    rel.add_argument("--to", help="this user instead of the message's recipients")
    hold = command(archive, "hold", cmd_archive_hold, "legal hold: held mail is never purged")
    hold.add_argument("action", choices=("add", "remove", "list"))
    hold.add_argument("who", nargs="*", metavar="ADDRESS|@DOMAIN")
    find = command(archive, "search", cmd_archive_search, "find archived messages, newest first "
                   "(every hit: no cap)")
    _query_arguments(find)
    find.add_argument("--json", action="store_true", help="one JSON object per line")
    command(archive, "reindex", cmd_archive_reindex, "build the search index again from the archive's "
            "files")
    exp = command(archive, "export", cmd_archive_export, "write what a search finds (everything "
                  "without a query) to an mbox or a zip of .eml files")
    _query_arguments(exp)
    exp.add_argument("--format", choices=FORMATS, default="mbox")
    exp.add_argument("-o", "--output", required=True, help="the file to write")
    ver = command(archive, "verify", cmd_archive_verify, "check the day chains and message hashes")
    ver.add_argument("--since", type=_day_arg, help="from this day (YYYY-MM-DD)")


def _query_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("words", nargs="*", help="words in the subject or the text")
    sub.add_argument("--user", help="mail this user (or @domain) sent or got (Bcc recipients too)")
    sub.add_argument("--from", dest="sender", help="the From: header's address")
    sub.add_argument("--to", help="an address in To: or Cc:")
    sub.add_argument("--subject", help="words in the subject")
    sub.add_argument("--since", type=_day_arg)
    sub.add_argument("--until", type=_day_arg)
    sub.add_argument("--direction", choices=("in", "out"))
    sub.add_argument("--attachment", action="store_true", help="only messages with attachments")


def _day_arg(text: str) -> str:
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a date like 2026-12-01") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="continuity-relay",
                                     description="Self-hosted e-mail continuity relay.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(group, name: str, func, help_text: str) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("-c", "--config", default="config.yaml",
                         help="configuration file (default: config.yaml)")
        sub.set_defaults(func=func)
        return sub

    command(commands, "serve", cmd_serve, "run the relay in the foreground")
    command(commands, "check", cmd_check, "validate the configuration file")
    command(commands, "status", cmd_status, "show each domain's state and replay queue")
    rep = command(commands, "replay", cmd_replay, "replay waiting mail to the primary now, in the "
                  "foreground, with a progress bar")
    rep.add_argument("--domain", help="only this domain")
    rep.add_argument("--dry-run", action="store_true", help="show what would be replayed")
    users = commands.add_parser("users", help="manage registered users").add_subparsers(
        dest="users_command", required=True)
    add = command(users, "add", cmd_users_add, "register a user")
    add.add_argument("email")
    add.add_argument("--name", default="")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    imp = command(users, "import", cmd_users_import, "register users from a CSV file "
                  "(header row; columns email, name, optional password and alternate)")
    imp.add_argument("file")
    pw = command(users, "passwd", cmd_users_passwd, "set a user's password")
    pw.add_argument("email")
    pw.add_argument("--password-stdin", action="store_true", required=True)
    upd = command(users, "set", cmd_users_set, "change a user's settings")
    upd.add_argument("email")
    upd.add_argument("--alternate", metavar="ADDRESS",
                     help="where outage start and end notices go (outside the user's domain); '' clears it")
    for name, func in (("activate", cmd_users_activate), ("deactivate", cmd_users_deactivate)):
        command(users, name, func, f"{name} a user").add_argument("email")
    lst = command(users, "list", cmd_users_list, "list registered users")
    lst.add_argument("--domain")
    admins = commands.add_parser("admins", help="manage administrators of the web control panel"
                                 ).add_subparsers(dest="admins_command", required=True)
    for name, func, help_text in (("add", cmd_admins_add, "add an administrator (any domain)"),
                                  ("passwd", cmd_admins_passwd, "set an administrator's password")):
        sub = command(admins, name, func, help_text)
        sub.add_argument("email")
        sub.add_argument("--password-stdin", action="store_true", required=True,
                         help="read the password from the first line of standard input")
    command(admins, "list", cmd_admins_list, "list administrators")
    _queue_commands(commands, command)
    _archive_commands(commands, command)
    _outage_commands(commands, command)
    ready = command(commands, "readiness", cmd_readiness, "what would hurt in an outage now, one "
                    "line a check (name, ok|warn|fail, detail); exit 1 when something fails")
    ready.add_argument("--domain", help="only this domain's checks (and the relay's own)")
    ready.add_argument("--json", action="store_true", help="one JSON object per line")
    rehearse = command(commands, "drill", cmd_drill, "rehearse an outage for one test user: keep a "
                       "message, read it over IMAP, reply through submission, replay both")
    rehearse.add_argument("--domain", required=True)
    rehearse.add_argument("--user", required=True, help="the test user (address or local part)")
    rehearse.add_argument("--password-stdin", action="store_true",
                          help="the user's password, first line of standard input")
    rehearse.add_argument("--password-file", help="a file whose first line is the user's password")
    return parser


def _outage_commands(commands, command) -> None:
    outage = commands.add_parser("outage", help="planned outages: divert a domain on purpose "
                                 "(maintenance, migration)").add_subparsers(dest="outage_command",
                                                                           required=True)
    start = command(outage, "start", cmd_outage_start, "keep the domain's mail as in an outage, "
                    "without asking the primary, until --until or `outage end`")
    start.add_argument("--domain", required=True)
    start.add_argument("--until", help="a time (2026-12-05 20:00, local unless it says +01:00 or "
                       "Z) or a duration from now (2h)")
    start.add_argument("--reason", help="one line, shown in status and the panel")
    end = command(outage, "end", cmd_outage_end, "end the domain's planned outage: replay runs")
    end.add_argument("--domain", required=True)


def _queue_commands(commands, command) -> None:
    queue = commands.add_parser("queue", help="list and manage queued mail (like postqueue and "
                                "postsuper)").add_subparsers(dest="queue_command", required=True)
    lst = command(queue, "list", cmd_queue_list, "list queue entries (never a message body)")
    lst.add_argument("--domain")
    lst.add_argument("--queue", choices=spool.QUEUES)
    lst.add_argument("--state", choices=spool.SHOWN_STATES)
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    show = command(queue, "show", cmd_queue_show, "an entry's envelope and headers")
    show.add_argument("id")
    show.add_argument("--body", action="store_true", help="the whole message, not only its headers")
    for name, func, help_text in (
            ("hold", cmd_queue_hold, "set entries aside: no runner touches them until released"),
            ("release", cmd_queue_release, "put held entries back to waiting, due now"),
            ("retry", cmd_queue_retry, "put failed or deferred entries back to waiting, due now"),
            ("delete", cmd_queue_delete, "remove entries for good (a Maildir copy stays)")):
        sub = command(queue, name, func, help_text)
        sub.add_argument("ids", nargs="*", metavar="ID")
        if name in ("hold", "release"):
            sub.add_argument("--domain", help="every entry of this domain's replay queue")
        if name == "delete":
            sub.add_argument("--yes", action="store_true", help="do not ask")
    flush = command(queue, "flush", cmd_queue_flush, "try deferred mail now (like postqueue -f)")
    flush.add_argument("--domain")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    finally:
        stop()                         # every queued log line is written before we return


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except ConfigErrors as exc:
        print(exc, file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"continuity-relay: {exc}", file=sys.stderr)
        return 2
    except (DirectoryError, StorageError, EntryError) as exc:
        print(f"continuity-relay: {exc}", file=sys.stderr)
        return 1
    except RelayError as exc:
        print(f"continuity-relay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1
