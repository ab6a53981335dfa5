"""New passwords typed into the web forms: what is accepted, and generated ones.

The passwd-file takes any non-empty one-line password (directory.hash_password); the web forms
also ask for a minimum length and the same password twice.
"""

from __future__ import annotations

import secrets

MIN_LENGTH = 8
MAX_LENGTH = 1024
# No 0/O, 1/l/I: a generated password is read out over the phone.
_ALPHABET = "abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def problem(password: str, repeat: str) -> str | None:
    """Why a new password typed twice is refused, or None when it is acceptable."""
    if password != repeat:
        return "The two new passwords differ."
    if len(password) < MIN_LENGTH:
        return f"A password needs at least {MIN_LENGTH} characters."
    if len(password) > MAX_LENGTH:
        return f"A password may have at most {MAX_LENGTH} characters."
    if any(c in password for c in "\x00\r\n"):
        return "A password must be on one line."
    return None


def generate() -> str:
    """Four groups of four characters, about 93 bits: `Xk7p-2mQa-...`."""
    return "-".join("".join(secrets.choice(_ALPHABET) for _ in range(4)) for _ in range(4))
