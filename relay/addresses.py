"""Addresses: parse, normalise and check them before they become paths or passwd-file keys.

An address that passes `parse_mailbox` is safe to use as `<domain>/<localpart>` under a storage
root: no `/`, `\\`, NUL, control characters, `..`, leading dots, and within RFC 5321 lengths.
Local parts and domains are lower-cased, as Dovecot's `%Lu` does with user names.

`client_network` groups client IP addresses, for the connection limits and the login lock.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

MAX_LOCAL = 64
MAX_DOMAIN = 253
MAX_ADDRESS = 254

# atext of RFC 5322 minus the characters that mean something to a file system, to the
# passwd-file (`:`) or to old source routing (`%`, `!`); non-ASCII letters are allowed (SMTPUTF8).
_LOCAL_CHARS = re.compile(r"^[A-Za-z0-9#$&'*+\-=?^_`{|}~.\u0080-\U0010ffff]+$")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class AddressError(ValueError):
    """An address that is malformed or unsafe to use as a path."""


@dataclass(frozen=True)
class Mailbox:
    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    def path_under(self, root: Path) -> Path:
        """`root/<domain>/<local>`: both parts were checked, so this stays under root."""
        return root / self.domain / self.local


def normalise_domain(text: str) -> str:
    """Lower-case and check a domain name; IDNs become their ASCII (punycode) form."""
    domain = text.strip().rstrip(".").lower()
    if not domain:
        raise AddressError("empty domain")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise AddressError("not a valid international domain name") from None
    if len(domain) > MAX_DOMAIN:
        raise AddressError("domain too long")
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise AddressError(f"not a domain name: {text!r}")
    return domain


def normalise_local(text: str) -> str:
    """Lower-case and check a local part; refuses anything that could escape a folder."""
    local = text.lower()
    if not local:
        raise AddressError("empty local part")
    if len(local.encode("utf-8")) > MAX_LOCAL:
        raise AddressError("local part too long")
    if not local.isprintable() or not _LOCAL_CHARS.match(local):
        raise AddressError("local part has characters that are not allowed")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise AddressError("local part has a leading, trailing or double dot")
    return local


def parse_mailbox(text: str) -> Mailbox:
    """`Local@Example.COM` (angle brackets allowed) -> Mailbox('local', 'example.com')."""
    address = text.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if len(address.encode("utf-8")) > MAX_ADDRESS:
        raise AddressError("address too long")
    if any(ord(c) < 32 or ord(c) == 127 for c in address):
        raise AddressError("control characters in address")
    local, at, domain = address.rpartition("@")
    if not at or not local:
        raise AddressError("expected local@domain")
    if local.startswith('"'):
        raise AddressError("quoted local parts are not accepted")
    return Mailbox(normalise_local(local), normalise_domain(domain))


def parse_sender(text: str) -> str:
    """The envelope sender as we pass it on: '' for the null sender, else the address as given.

    The sender never becomes a path, but it does go into a Return-Path header and the queue
    envelope, so line breaks and control characters are refused.
    """
    address = text.strip()
    if address in ("", "<>"):
        return ""
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if len(address.encode("utf-8")) > MAX_ADDRESS:
        raise AddressError("address too long")
    if any(ord(c) < 33 or ord(c) == 127 for c in address) or "@" not in address:
        raise AddressError("malformed sender address")
    return address


def client_network(host: str, v4_prefix: int = 32) -> str | None:
    """The network a client IP address counts as: its IPv4 /`v4_prefix` (an IPv4-mapped IPv6
    address counts as IPv4), or its IPv6 /64 (what one subscriber usually gets). None for
    something that is not an IP address."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = v4_prefix if isinstance(ip, ipaddress.IPv4Address) else 64
    network = ipaddress.ip_network((ip, prefix), strict=False)
    return str(ip) if network.num_addresses == 1 else str(network)
