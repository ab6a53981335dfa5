"""Fixtures for integration tests that run real services (Dovecot, ...)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

try:  # tests/integration as a package ...
    from . import dovecot as dc
    from . import rspamd as rs
except ImportError:  # ... or as a rootdir-less test directory (pytest prepends it to sys.path)
    import dovecot as dc
    import rspamd as rs

DovecotFactory = Callable[..., dc.Dovecot]


@pytest.fixture
def mail_tmp_path() -> Iterator[Path]:
    """A fresh directory (mode 0711, in /tmp, removed at teardown) that
    Dovecot's non-root processes can reach: put Maildirs and the passwd-file
    under it. pytest's tmp_path cannot serve: /tmp/pytest-of-root is 0700."""
    path = dc.make_shared_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def dovecot_factory() -> Iterator[DovecotFactory]:
    """`dovecot_factory(workdir, maildirs, users_file, mail_user="vmail")` starts
    a Dovecot from contrib/dovecot/dovecot.conf and returns a dc.Dovecot
    (.imap_port, .pop3_port, .log_text(), .stop()). Every instance started is
    stopped at teardown. Dovecot is required, never skipped: CI installs it."""
    try:
        dc.require_dovecot()
    except dc.DovecotError as exc:
        pytest.fail(str(exc), pytrace=False)

    started: list[dc.Dovecot] = []

    def factory(
        workdir: Path, maildirs: Path, users_file: Path, mail_user: str = "vmail"
    ) -> dc.Dovecot:
        try:
            instance = dc.start_dovecot(workdir, maildirs, users_file, mail_user)
        except dc.DovecotError as exc:
            pytest.fail(str(exc), pytrace=False)
        started.append(instance)
        return instance

    yield factory
    dc.stop_all(started)


@pytest.fixture(scope="session")
def rspamd_server() -> Iterator[rs.RspamdServer]:
    """One real rspamd for the session (tests/integration/rspamd.py): `.url` is its normal
    worker on a loopback port. Required, never skipped: CI installs it."""
    try:
        server = rs.start_rspamd()
    except rs.RspamdError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


try:  # the Postfix instances' fixture lives with its helper
    from .postfix import postfix_factory  # noqa: F401
except ImportError:
    from postfix import postfix_factory  # noqa: F401
