"""The SMTP listeners (aiosmtpd handlers) and every reply string they send."""
