"""Once-only facts the relay must remember across restarts, in one small JSON file:

    <spool>/alerts/marks.json    {"subscription:example.com": "2027-12-31:7", ...}

Today that is which subscription reminders went out (relay/delivery/alerts.py), so a restart
does not send them again. `set()` replaces the file atomically (temp file, fsync, rename): a
crash leaves the old marks or the new ones, and at worst one reminder goes out twice. A file
that cannot be read counts as empty (a reminder again, never none).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from relay.storage.durable import Owner, make_dirs, replace_file


def marks_path(spool: Path) -> Path:
    return spool / "alerts" / "marks.json"


class Marks:
    def __init__(self, path: Path, owner: Owner = Owner()) -> None:
        self.path = path
        self.owner = owner
        self._lock = threading.Lock()

    def _read(self) -> dict[str, str]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._read().get(key)

    def starting(self, prefix: str) -> dict[str, str]:
        """Every mark whose key starts with `prefix`, the prefix cut off."""
        with self._lock:
            return {k[len(prefix):]: v for k, v in self._read().items() if k.startswith(prefix)}

    def set(self, key: str, value: str | None) -> None:
        """Blocking: the file is rewritten and fsync'd. None removes the mark."""
        with self._lock:
            marks = self._read()
            if value is None:
                if key not in marks:
                    return
                del marks[key]
            else:
                marks[key] = value
            make_dirs(self.path.parent, self.owner)
            replace_file(self.path, json.dumps(marks, sort_keys=True).encode("utf-8"), 0o600, self.owner)
