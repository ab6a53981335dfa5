"""The project's own error types; library errors are translated into these at the edges.

    RelayError
    +-- ConfigError        a bad setting: names the file and the dotted key (exit 2)
    +-- UsageError         bad command-line input (exit 2)
    +-- DirectoryError     a user-directory operation that cannot be done (exit 1)
    +-- StorageError       the relay's own disk failed (full, permission): always temporary
    +-- CorruptEntryError  a queue entry that cannot be read
    +-- EntryError         an administrator's queue action on an entry that is not there, or
                           not in a state that action takes (exit 1)
    +-- PlannedError       a planned outage change that cannot be made: ending one that is not
                           going on, an `until` in the past (exit 1)
    +-- DeliveryError      talking to another server failed
        +-- PermFail       5xx: refused for good (raised by the sending checks; a temporary
                           failure is a `delivery.client.Reply`, never an exception)

Anything not in this tree that reaches an SMTP session is answered as temporary (451).
"""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


class ConfigError(RelayError):
    """A configuration problem, located by file and dotted key."""

    def __init__(self, file: str, key: str, message: str) -> None:
        self.file, self.key, self.message = file, key, message
        super().__init__(f"{file}: {key}: {message}")


class ConfigErrors(RelayError):
    """Every problem found in one configuration file, one line each."""

    def __init__(self, problems: list[ConfigError]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class UsageError(RelayError):
    """Bad input on the command line."""


class DirectoryError(RelayError):
    """A user-directory change that cannot be made (unknown user, bad domain...)."""


class StorageError(RelayError):
    """The relay could not write its own files; callers answer 4xx."""


class CorruptEntryError(RelayError):
    """A queue entry whose files cannot be read back."""


class EntryError(RelayError):
    """A queue entry that is missing, or in the wrong state for what was asked."""


class PlannedError(RelayError):
    """A planned outage start, end or window that cannot be made as asked."""


class DeliveryError(RelayError):
    """Another SMTP server did not take a message."""

    def __init__(self, code: int, text: str) -> None:
        self.code, self.text = code, text
        super().__init__(f"{code} {text}")


class PermFail(DeliveryError):
    """A permanent refusal: 5xx."""
