"""The panel's Readiness page (issue 12, point 5): the command's report, for administrators
only, each check a row, escaped."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.timeout(60)


def test_the_readiness_page_lists_every_check(server, admin, client):
    reply = client.get("/panel/readiness")
    assert reply.status in (302, 303) and "/panel/login" in (reply.location or "")
    page = admin.get("/panel/readiness")
    assert page.status == 200 and "Something fails" in page.text
    rows = re.findall(r'<tr class="result-(\w+)">\s*<td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td>',
                      page.body)
    found = {(domain, name): result for result, domain, name, _ in rows}
    assert found[("example.com", "passwords")] == "fail"        # carol has none
    assert found[("(relay)", "imap")] == "warn"                  # readiness.imap not set
    assert found[("(relay)", "smarthost")] == "warn"
    assert ("example.org", "subscription") in found
    only = admin.get("/panel/readiness?domain=example.org")
    assert "example.com" not in re.sub(r"<p>.*?</p>", "", only.body.split("<table")[1], flags=re.S)
    assert admin.get("/panel/readiness?domain=nonesuch.test").status == 404
