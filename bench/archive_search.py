"""Archive search: ingest rate, query latency, reindex time and size of the SQLite FTS5 index.

Generates N messages (default 100,000; `--messages 1000000` for the large case) spread over
DAYS days into a temp archive, through the real `ArchiveWriter` with the index as its
`on_written` hook, then measures:

  ingest     messages/s through `ArchiveIndex.add` (parse, text, SQLite), timed inside the
             hook only; the share of that spent reading and parsing the messages
  queries    p50/p95 latency of "one word + a date range, newest 50" (words of every frequency,
             7- and 30-day ranges), plus a few other shapes (a user, a user and a word, page
             20, a count), on the index as ingested and again after the reindex (optimised)
  reindex    seconds to rebuild the index from the files and put it in place
  size       the index's bytes as a share of the archive's (packs, objects and day files)
  open       p50/p95 of opening a hit: `Archive.get` of its id and its first 64 KiB read

Messages, seeded and reproducible: a Zipf vocabulary of 40,000 made-up words; bodies of
lognormal length (median 120 words); 35% with an HTML alternative, 12% with a base64
attachment of lognormal size (median 80 KB, at most 8 MB); 500 local users, 5,000
correspondents, 1-3 recipients, 10% with a Bcc recipient; 70% inbound.

The fill writes the archive with the writer's syncfs (or fsyncs) off (`--fsync` keeps them):
the archive's own disk cost is not what is measured here, and the fill time is printed apart.

Usage: .venv/bin/python bench/archive_search.py [--messages 100000] [--days 90] [--queries 200]
       [--seed 1] [--fsync] [--plans] [--keep] [--dir DIR]
Exit status 0 when every step succeeded and every count matched, 1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import base64
import calendar
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from relay.storage import archive_index
from relay.storage.archive import Archive, ArchiveWriter, Item
from relay.storage.archive_index import ArchiveIndex, Query

BATCH = 200
LAST_DAY = date(2026, 11, 30)
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["qu", "th", "ch", "sh", "ll"]


class BenchError(Exception):
    """A step failed or a count did not match."""


class Corpus:
    """Seeded message generator (see the module's text)."""

    def __init__(self, seed: int, messages: int, days: int) -> None:
        self.rng = random.Random(seed)
        self.messages = messages
        self.first = calendar.timegm((LAST_DAY - timedelta(days=days - 1)).timetuple())
        self.span = days * 86400
        words: set[str] = set()
        while len(words) < 40_000:
            words.add("".join(self.rng.choices(SYLLABLES, k=self.rng.choice((2, 2, 3, 3, 3, 4)))))
        self.vocabulary = sorted(words, key=lambda w: (len(w), w))
        self.rng.shuffle(self.vocabulary)
        weights = [1 / (rank ** 1.07) for rank in range(1, len(self.vocabulary) + 1)]
        self.cumulative = list(_accumulate(weights))
        self.users = [f"user{n}@example.com" for n in range(500)]
        domains = [f"{self.rng.choice(self.vocabulary)}.test" for _ in range(400)]
        self.correspondents = [f"{self.rng.choice(self.vocabulary)}{n}@{self.rng.choice(domains)}"
                               for n in range(5000)]

    def words(self, count: int) -> list[str]:
        return self.rng.choices(self.vocabulary, cum_weights=self.cumulative, k=count)

    def items(self) -> Iterator[Item]:
        for n in range(self.messages):
            yield self.item(n)

    def item(self, n: int) -> Item:
        rng = self.rng
        when = self.first + (n + rng.random()) * self.span / self.messages
        inbound = rng.random() < 0.7
        user = rng.choice(self.users)
        others = rng.sample(self.correspondents, rng.choice((1, 1, 1, 2, 3)))
        sender, shown = (rng.choice(self.correspondents), [user, *others[1:]]) if inbound else (user, others)
        bcc = [rng.choice(self.users if inbound else self.correspondents)] if rng.random() < 0.1 else []
        rcpts = tuple(dict.fromkeys(shown + bcc))
        data = self.message(n, sender, shown, when)
        return Item(data=data, direction="in" if inbound else "out", kind="passed" if inbound else "sent",
                    sender=sender, rcpts=rcpts, queue_id=f"q{n}", outcome="primary 250",
                    user="" if inbound else user, when=when)

    def message(self, n: int, sender: str, to: list[str], when: float) -> bytes:
        rng = self.rng
        subject = " ".join(self.words(rng.randint(3, 8)))
        length = min(15_000, max(5, int(rng.lognormvariate(4.8, 0.9))))
        sentences = [" ".join(self.words(rng.randint(6, 18))) + "." for _ in range(0, length, 12)]
        text = "\r\n".join(" ".join(sentences[i:i + 5]) for i in range(0, len(sentences), 5))
        stamp = datetime.fromtimestamp(when, UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
        head = (f"From: {sender}\r\nTo: {', '.join(to)}\r\nSubject: {subject}\r\nDate: {stamp}\r\n"
                f"Message-ID: <{n}.{rng.getrandbits(48):x}@bench.test>\r\nMIME-Version: 1.0\r\n")
        parts = [f"Content-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"]
        if rng.random() < 0.35:
            html = "".join(f"<p style=\"margin:0\">{s}</p>" for s in sentences)
            parts = [f"Content-Type: multipart/alternative; boundary=alt{n}\r\n\r\n--alt{n}\r\n{parts[0]}"
                     f"--alt{n}\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<html><head><style>"
                     f"p {{ font-family: sans-serif }}</style></head><body>{html}</body></html>\r\n"
                     f"--alt{n}--\r\n"]
        if rng.random() < 0.12:
            size = min(8 << 20, int(rng.lognormvariate(11.3, 1.2)))
            blob = base64.encodebytes(rng.randbytes(size)).decode().replace("\n", "\r\n")
            parts.append(f"Content-Type: application/octet-stream; name=file{n}.bin\r\n"
                         f"Content-Disposition: attachment; filename=file{n}.bin\r\n"
                         f"Content-Transfer-Encoding: base64\r\n\r\n{blob}")
        if len(parts) == 1:
            return (head + parts[0]).encode()
        body = "".join(f"--mix{n}\r\n{part}" for part in parts) + f"--mix{n}--\r\n"
        return (head + f"Content-Type: multipart/mixed; boundary=mix{n}\r\n\r\n" + body).encode()


def _accumulate(values: list[float]) -> Iterator[float]:
    total = 0.0
    for value in values:
        total += value
        yield total


# -- measuring -----------------------------------------------------------------------------------

class Timer:
    """Wraps a callable and adds up the seconds spent in it, and its thread's CPU seconds (which
    the neighbours' load on a shared machine moves less)."""

    def __init__(self, call: Callable) -> None:
        self.call, self.seconds, self.cpu, self.calls = call, 0.0, 0.0, 0

    def __call__(self, *args: object) -> object:
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return self.call(*args)
        finally:
            self.seconds += time.perf_counter() - start
            self.cpu += time.thread_time() - cpu
            self.calls += 1


def fill(archive: Archive, index: ArchiveIndex, corpus: Corpus, fsync: bool) -> tuple[float, Timer, Timer]:
    """(fill seconds in all, the index's add timer, the parse timer inside it)."""
    add = Timer(index.add)
    parse = Timer(archive_index._document)
    archive_index._document = parse
    writer = ArchiveWriter(archive, on_written=add)
    if not fsync:
        writer._sync = lambda *written: None      # the batch's syncfs (or fsyncs): not measured
    start = time.perf_counter()
    try:
        batch: list[Item] = []
        for number, item in enumerate(corpus.items(), 1):
            batch.append(item)
            if len(batch) == BATCH:
                writer.write(batch)
                batch = []
            if number % 20_000 == 0:
                print(f"  ... {number} messages, index {add.seconds:.0f}s", flush=True)
        if batch:
            writer.write(batch)
    finally:
        archive_index._document = parse.call
    return time.perf_counter() - start, add, parse


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def queries(corpus: Corpus, count: int, days: int, seed: int) -> dict[str, list[Query]]:
    """The query shapes measured; words drawn by log-rank, so common and rare ones both come."""
    rng = random.Random(seed + 1)
    vocab = corpus.vocabulary

    def word() -> str:
        return vocab[min(len(vocab) - 1, int(10 ** rng.uniform(0, 4.5)) - 1)]

    def window(length: int) -> tuple[date, date]:
        end = LAST_DAY - timedelta(days=rng.randrange(max(1, days - length + 1)))
        return end - timedelta(days=length - 1), end

    def ranged(length: int, **more: object) -> Query:
        since, until = window(length)
        return Query(since=since, until=until, **more)

    return {
        "word+7d": [ranged(7, words=word()) for _ in range(count)],
        "word+30d": [ranged(30, words=word()) for _ in range(count)],
        "common word+30d": [ranged(30, words=vocab[rng.randrange(5)]) for _ in range(count // 4)],
        "subject word+30d": [ranged(30, subject=word()) for _ in range(count // 4)],
        "user": [Query(user=rng.choice(corpus.users)) for _ in range(count // 4)],
        "user+word": [Query(user=rng.choice(corpus.users), words=word()) for _ in range(count // 4)],
        "correspondent+30d": [ranged(30, to=rng.choice(corpus.correspondents)) for _ in range(count // 4)],
        "attachment+7d": [ranged(7, has_attachment=True) for _ in range(count // 4)],
    }


def measure(index: ArchiveIndex, shapes: dict[str, list[Query]]) -> list[str]:
    lines = []
    for name, batch in shapes.items():
        seconds, hits = [], 0
        for query in batch:
            start = time.perf_counter()
            hits += len(index.search(query).records)
            seconds.append(time.perf_counter() - start)
        lines.append(f"  {name:18} n={len(batch):4} p50={percentile(seconds, .5) * 1000:7.1f}ms "
                     f"p95={percentile(seconds, .95) * 1000:7.1f}ms max={max(seconds) * 1000:7.1f}ms "
                     f"hits/page={hits / len(batch):.0f}")
    common = next(iter(shapes["common word+30d"]))
    for label, call in (("page 20 (common word)", lambda: index.search(Query(words=common.words), page=20)),
                        ("count (common word)", lambda: index.count(Query(words=common.words))),
                        ("count (everything)", lambda: index.count(Query()))):
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            call()
            runs.append(time.perf_counter() - start)
        lines.append(f"  {label:22} median of 5 {statistics.median(runs) * 1000:.1f}ms")
    lines.append(opening(index, shapes))
    return lines


def opening(index: ArchiveIndex, shapes: dict[str, list[Query]]) -> str:
    """Opening a hit (what the panel's and the webmail's message page do): `Archive.get` of
    its id, then its headers read; over the first hit of each word+7d query."""
    ids = [found.records[0].id for query in shapes["word+7d"]
           if (found := index.search(query)).records]
    seconds = []
    for record_id in ids:
        start = time.perf_counter()
        index.archive.read(index.archive.get(record_id), 64 * 1024)
        seconds.append(time.perf_counter() - start)
    if not seconds:
        return "  open a hit: no hits"
    return (f"  open a hit (get + read) n={len(seconds):4} p50={percentile(seconds, .5) * 1000:7.1f}ms "
            f"p95={percentile(seconds, .95) * 1000:7.1f}ms max={max(seconds) * 1000:7.1f}ms")


def plans(index: ArchiveIndex, shapes: dict[str, list[Query]]) -> list[str]:
    lines = []
    with index._connection() as conn:
        for name, batch in shapes.items():
            sql, params, newest = index._where(batch[0])
            plan = conn.execute("EXPLAIN QUERY PLAN SELECT r.line " + sql + newest,
                                [*params, 51, 0]).fetchall()
            lines.append(f"  {name}: " + " | ".join(row[-1] for row in plan))
    return lines


def size_of(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return total


def share(index: ArchiveIndex, archive_bytes: int) -> str:
    size = size_of([index.path, index.path.with_name(index.path.name + "-wal")])
    return f"{size / 2**20:.0f}MiB = {size / archive_bytes:.1%} of the archive"


def run(args: argparse.Namespace, root: Path) -> None:
    archive = Archive(root / "archive", days=3650)
    index = ArchiveIndex(archive)
    corpus = Corpus(args.seed, args.messages, args.days)
    print(f"fill: {args.messages} messages over {args.days} days into {archive.root}", flush=True)
    seconds, add, parse = fill(archive, index, corpus, args.fsync)
    archive_bytes = size_of([archive.root / "packs", archive.root / "objects", archive.root / "days"])
    print(f"fill seconds={seconds:.1f} (archive writes{'' if args.fsync else ', no fsync'} + index) "
          f"archive={archive_bytes / 2**20:.0f}MiB avg-message={archive_bytes / args.messages / 1024:.1f}KiB")
    rate = args.messages / add.seconds
    print(f"ingest msg/s={rate:.0f} (index add only: {add.seconds:.1f}s over {add.calls} batches; "
          f"reading+parsing {parse.seconds / add.seconds:.0%} of it; "
          f"CPU {add.cpu / args.messages * 1000:.2f} ms a message = "
          f"{args.messages / add.cpu:.0f} msg/s a core)")
    total = index.count(Query())
    if total != args.messages:
        raise BenchError(f"the index holds {total} records, not {args.messages}")
    shapes = queries(corpus, args.queries, args.days, args.seed)
    if args.plans:
        print("query plans:", *plans(index, shapes), sep="\n")
    print(f"index as ingested: {share(index, archive_bytes)}")
    print("queries (as ingested), newest 50:", *measure(index, shapes), sep="\n", flush=True)
    start = time.perf_counter()
    count = index.reindex()
    reindexed = time.perf_counter() - start
    if count != args.messages:
        raise BenchError(f"reindex indexed {count} records, not {args.messages}")
    print(f"reindex seconds={reindexed:.1f} ({count / reindexed:.0f} msg/s)")
    print(f"index after reindex: {share(index, archive_bytes)}")
    print("queries (after reindex), newest 50:", *measure(index, shapes), sep="\n")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}MiB")
    index.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--queries", type=int, default=200, help="per word+range shape")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fsync", action="store_true", help="keep the archive writer's fsyncs")
    parser.add_argument("--plans", action="store_true", help="print SQLite's plan for each query shape")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir for inspection")
    parser.add_argument("--dir", type=Path, help="where to make the temp dir")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.days < 30 or args.queries < 4:
        parser.error("--messages >= 1, --days >= 30, --queries >= 4")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="archive-search-", dir=args.dir))
    failed = True
    try:
        run(args, root)
        failed = False
    except BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
    finally:
        if args.keep or failed:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
