"""Exporting archived messages: an mbox file or a zip of .eml files, written as a stream.

mbox is mboxrd-free "mboxo", as Python's `mailbox.mbox` reads it: a `From ` line (envelope
sender, UTC date) before each message and a blank line after it. A message line starting with
`From ` would need quoting, which no reader undoes byte for byte, so such a message is refused
for mbox (say `--format eml-zip`, which keeps every byte). The zip holds `<archive id>.eml`
each, stored as archived.
"""

from __future__ import annotations

import re
import time
import zipfile
from collections.abc import Callable, Iterable
from typing import BinaryIO

from relay.errors import EntryError
from relay.storage.archive import Archive, Record

FORMATS = ("mbox", "eml-zip")
_FROM_LINE = re.compile(rb"(?:^|\n)From ")


def export(archive: Archive, records: Iterable[Record], out: BinaryIO, fmt: str,
           progress: Callable[[int], None] = lambda n: None) -> int:
    """Write every record's message to `out` in `fmt`; returns how many. Blocking."""
    if fmt == "mbox":
        return _mbox(archive, records, out, progress)
    if fmt == "eml-zip":
        return _zip(archive, records, out, progress)
    raise EntryError(f"{fmt!r}: not one of {', '.join(FORMATS)}")


def _mbox(archive: Archive, records: Iterable[Record], out: BinaryIO,
          progress: Callable[[int], None]) -> int:
    count = 0
    for record in records:
        data = archive.read(record)
        if _FROM_LINE.search(data):
            raise EntryError(f"{record.id}: a line starts with 'From ', which mbox cannot keep "
                             "byte for byte; export it with --format eml-zip")
        stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(record.time))
        out.write(f"From {record.sender or 'MAILER-DAEMON'} {stamp}\n".encode())
        out.write(data)
        out.write(b"\n" if data.endswith(b"\n") else b"\n\n")
        count += 1
        progress(1)
    return count


def _zip(archive: Archive, records: Iterable[Record], out: BinaryIO,
         progress: Callable[[int], None]) -> int:
    count = 0
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as bundle:
        for record in records:
            with bundle.open(f"{record.id}.eml", "w") as member:
                member.write(archive.read(record))
            count += 1
            progress(1)
    return count
