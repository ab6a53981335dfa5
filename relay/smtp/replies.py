"""Every SMTP reply the relay composes itself, in one place.

A test checks that each enhanced status code's class matches its basic code (2.x.x for 2xx...).
Replies relayed from a primary server are formatted by `relayed()`, which keeps the primary's
code and text but never lets a line break in that text inject extra reply lines.
"""

from __future__ import annotations

SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
QUEUED = "250 2.0.0 OK: queued as {id}"
DELIVERED = "250 2.0.0 OK: delivered as {id}"

BAD_SENDER = "553 5.1.7 Sender address rejected: {reason}"
BAD_RECIPIENT = "553 5.1.3 Recipient address rejected: {reason}"
RELAY_DENIED = "550 5.7.1 Relay access denied: {domain} is not served here"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
PRIMARY_UNREACHABLE = "451 4.4.1 Mail server for {domain} not reachable, try again later"
SPLIT_OUTCOME = "451 4.3.0 Recipients cannot all be accepted now, try again later"
LOCAL_ERROR = "451 4.3.0 Temporary local problem, try again later"
BAD_PARAMETER = "501 5.5.4 Invalid parameter: {reason}"
NUL_REFUSED = "550 5.6.0 Message refused: it contains NUL characters"

# Submission (relay/smtp/submission.py)
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
AUTH_BLOCKED = "454 4.7.0 Too many failed logins, try again later"
AUTH_UNAVAILABLE = "454 4.7.0 Temporary authentication failure, try again later"
AUTH_MALFORMED = "501 5.5.2 Cannot decode the authentication data"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
SENDER_NOT_OWN = "553 5.7.1 Sender address rejected: you may send only as {address}"
SENDING_DISABLED = "451 4.3.2 Sending is disabled on this relay: no smarthost configured"

# AUTH on the inbound port (relay/smtp/inbound.py); RFC 4954 section 4
AUTH_IN_TRANSACTION = "503 5.5.1 AUTH not permitted during a mail transaction"
# The spam filter on mail about to be kept (relay/smtp/spam.py)
SPAM_REJECTED = "550 5.7.1 Message rejected as spam"
SPAM_REJECTED_BECAUSE = "550 5.7.1 Message rejected as spam: {reason}"
SPAM_DEFERRED = "451 4.7.1 Message deferred by the spam filter, try again later"
SPAM_DEFERRED_BECAUSE = "451 4.7.1 Message deferred by the spam filter ({reason}), try again later"
SPAM_FILTER_UNAVAILABLE = "451 4.3.0 Spam filter unavailable, try again later"
# Connection and session limits (relay/smtp/limits.py); each closes the connection.
TOO_MANY_CONNECTIONS = "421 4.7.0 {hostname} Too many connections, try again later"
TOO_MANY_FROM_CLIENT = "421 4.7.0 {hostname} Too many connections from your address, try again later"
IDLE_TIMEOUT = "421 4.4.2 {hostname} Idle too long, closing connection"
TOO_MANY_ERRORS = "421 4.7.0 {hostname} Too many errors, closing connection"

ALL = (SENDER_OK, RECIPIENT_OK, QUEUED, DELIVERED, BAD_SENDER, BAD_RECIPIENT, RELAY_DENIED,
       TOO_MANY_RECIPIENTS, PRIMARY_UNREACHABLE, SPLIT_OUTCOME, LOCAL_ERROR, BAD_PARAMETER, NUL_REFUSED,
       AUTH_FAILED, AUTH_BLOCKED, AUTH_UNAVAILABLE, AUTH_MALFORMED, AUTH_REQUIRED, SENDER_NOT_OWN,
       SENDING_DISABLED, AUTH_IN_TRANSACTION,
       SPAM_REJECTED, SPAM_REJECTED_BECAUSE, SPAM_DEFERRED, SPAM_DEFERRED_BECAUSE,
       SPAM_FILTER_UNAVAILABLE,
       TOO_MANY_CONNECTIONS, TOO_MANY_FROM_CLIENT, IDLE_TIMEOUT, TOO_MANY_ERRORS)


def relayed(code: int, text: str) -> str:
    """A primary's reply, passed to our client as one or more well-formed reply lines."""
    lines = [line.strip() for line in text.replace("\r", "\n").split("\n") if line.strip()]
    lines = ["".join(c for c in line if c.isprintable())[:400] for line in lines] or [""]
    lines = lines[:10]
    head = [f"{code}-{line}" for line in lines[:-1]]
    return "\r\n".join([*head, f"{code} {lines[-1]}".rstrip()])
