"""Webmail without the web: what the aiohttp views call to show and send mail.

  render.py   a stored message -> display headers, text, sanitised HTML, attachments
  compose.py  form input -> a new message as bytes (for `Submitter.submit`); reply and forward drafts

Folders, message lists, flags, moves and deletes live in `relay.storage.maildir.MaildirStore`
(the only writer of user Maildirs). Everything here is blocking and CPU-bound on big messages:
call it through `asyncio.to_thread`.
"""
