"""The `continuity-relay` command: argument parsing, one function per command, no logic of its own.

Exit status: 0 success, 1 failure, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from relay import __version__, app
from relay.admins import Admins
from relay.config import Config, load
from relay.delivery.health import read_state
from relay.directory import Directory
from relay.errors import ConfigErrors, DirectoryError, RelayError, StorageError, UsageError
from relay.log import setup
from relay.storage.continuity import replay_queue_path
from relay.storage.queue import Queue, waiting_by_user
from relay.web.revoked import Revoked


def _config(args: argparse.Namespace) -> Config:
    return load(args.config)


def _password(args: argparse.Namespace) -> str | None:
    if not getattr(args, "password_stdin", False):
        return None
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise UsageError("--password-stdin: no password on standard input")
    return line


def cmd_serve(args: argparse.Namespace) -> int:
    config = _config(args)
    setup(config.log_level)
    asyncio.run(app.serve(config))
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
    user = Directory(_config(args)).add(args.email, args.name or "", _password(args))
    print(f"added {user.email}" + ("" if user.password_hash else " (no password: cannot log in)"))
    return 0


def cmd_users_import(args: argparse.Namespace) -> int:
    added, problems = Directory(_config(args)).import_csv(Path(args.file))
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"imported {len(added)} user(s), {len(problems)} line(s) refused")
    return 1 if problems else 0


def cmd_users_passwd(args: argparse.Namespace) -> int:
    password = _password(args)
    if password is None:
        raise UsageError("users passwd reads the new password with --password-stdin")
    print(f"password changed for {Directory(_config(args)).set_password(args.email, password).email}")
    return 0


def cmd_users_activate(args: argparse.Namespace) -> int:
    print(f"activated {Directory(_config(args)).set_active(args.email, True).email}")
    return 0


def cmd_users_deactivate(args: argparse.Namespace) -> int:
    config = _config(args)
    user = Directory(config).set_active(args.email, False)
    Revoked(config.web.revoked_file, config.web.session_lifetime).end_account(user.email)
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
    print(f"added administrator {Admins(_config(args)).add(args.email, password).email}")
    return 0


def cmd_admins_passwd(args: argparse.Namespace) -> int:
    password = _password(args)
    if password is None:
        raise UsageError("admins passwd reads the new password with --password-stdin")
    admin = Admins(_config(args)).set_password(args.email, password)
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
        state = read_state(config.storage.spool / "state", name)
        since = (dt.datetime.fromtimestamp(state.since).strftime("%Y-%m-%d %H:%M:%S")
                 if state.since else "-")
        queue = Queue(replay_queue_path(config.storage.spool, name))
        counts = [queue.count(s) for s in ("waiting", "active", "failed", "hold")]
        oldest = queue.oldest_age("waiting")
        sub = domain.continuity
        if sub is None:
            cover = "none"
        else:
            cover = f"{'active' if domain.continuity_active() else 'inactive'} {sub.since}..{sub.until}"
        print(f"{name:28} {state.state:9} {since:19} {counts[0]:>7} {counts[1]:>6} {counts[2]:>6} "
              f"{counts[3]:>5} {_age(oldest) if oldest is not None else '-':>6}  {cover}")
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
    setup(config.log_level)
    return asyncio.run(_replay(config, names))


async def _replay(config: Config, names: list[str]) -> int:
    status = 0
    for name in names:
        waiting = Queue(replay_queue_path(config.storage.spool, name)).count("waiting")
        with (tqdm(total=waiting, desc=name, unit="msg", file=sys.stderr, smoothing=0.1) as bar,
              logging_redirect_tqdm(loggers=[logging.getLogger("relay")])):  # logs above the bar
            result = await app.replay_once(config, name, bar.update)
        left = Queue(replay_queue_path(config.storage.spool, name)).count("waiting")
        stopped = f"; stopped by the primary: {result.fault}" if result.fault else ""
        print(f"{name}: {result.delivered} delivered, {result.failed} refused (sender notified), "
              f"{result.held} set aside, {left} still waiting{stopped}")
        status = 1 if result.fault or left else status
    return status


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
                  "(header row; columns email, name, optional password)")
    imp.add_argument("file")
    pw = command(users, "passwd", cmd_users_passwd, "set a user's password")
    pw.add_argument("email")
    pw.add_argument("--password-stdin", action="store_true", required=True)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigErrors as exc:
        print(exc, file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"continuity-relay: {exc}", file=sys.stderr)
        return 2
    except (DirectoryError, StorageError) as exc:
        print(f"continuity-relay: {exc}", file=sys.stderr)
        return 1
    except RelayError as exc:
        print(f"continuity-relay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1
