"""Talking to other SMTP servers: the primary, and later the smarthost."""
