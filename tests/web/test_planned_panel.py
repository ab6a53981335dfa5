"""The panel's planned outages (issue 12, point 4): start and end one, schedule and remove
windows, each behind the CSRF token, escaped on the page and written to the audit log once."""

from __future__ import annotations

import time

import pytest

from relay.storage.state import read_state, read_windows, state_dir

pytestmark = pytest.mark.timeout(60)

PAGE = "/panel/domains/example.com"


def _state(server):
    return read_state(state_dir(server.config.storage.spool), "example.com")


def _actions(server) -> list[str]:
    return [line.split("action=")[1].split()[0] for line in server.audit_lines() if "action=outage" in line]


def test_start_and_end_from_the_domain_page(server, admin):
    page = admin.get(PAGE)
    assert "Start a planned outage" in page.text
    assert admin.post(f"{PAGE}/outage/start", {"until": "2h"}, csrf=False).status == 403
    assert not _state(server).planned
    admin.get(PAGE)
    reply = admin.post(f"{PAGE}/outage/start", {"until": "2h", "reason": "<b>racks</b>"})
    assert (reply.status, reply.location) == (303, f"{PAGE}?done=outage_start")
    state = _state(server)
    assert state.planned and state.reason == "<b>racks</b>"
    assert abs(state.until - (time.time() + 7200)) < 60
    page = admin.get(PAGE)
    assert "&lt;b&gt;racks&lt;/b&gt;" in page.body and "<b>racks</b>" not in page.body
    assert "End the planned outage" in page.text
    assert admin.post(f"{PAGE}/outage/end", csrf=False).status == 403
    assert _state(server).planned
    admin.get(PAGE)
    assert admin.post(f"{PAGE}/outage/end").status == 303
    assert _state(server).state == "replaying"
    admin.get(PAGE)
    refused = admin.post(f"{PAGE}/outage/end")
    assert refused.status == 400 and "not in a planned outage" in refused.text
    assert _actions(server) == ["outage_start", "outage_end"]
    start = next(line for line in server.audit_lines() if "action=outage_start" in line)
    assert "domain=example.com until=" in start and "reason=<b>racks</b>" in start


def test_bad_input_is_refused_with_a_reason(server, admin):
    admin.get(PAGE)
    reply = admin.post(f"{PAGE}/outage/start", {"until": "yesterday"})
    assert reply.status == 400 and "expected a time" in reply.text
    admin.get(PAGE)
    reply = admin.post(f"{PAGE}/outage/start", {"until": "2020-01-01 00:00"})
    assert reply.status == 400 and "not in the future" in reply.text
    admin.get(PAGE)
    assert admin.post(f"{PAGE}/outage/start", {"reason": "two\nlines"}).status == 400
    assert not _state(server).planned and _actions(server) == []


def test_schedule_and_remove_a_window(server, admin):
    spool_state = state_dir(server.config.storage.spool)
    admin.get(PAGE)
    reply = admin.post(f"{PAGE}/outage/windows", {"start": "2099-01-01 20:00", "end": "2099-01-01 22:00",
                                                  "reason": "move"})
    assert reply.status == 303
    [window] = read_windows(spool_state, "example.com")
    assert window.start == 4070980800.0 and window.end == 4070988000.0       # UTC
    page = admin.get(PAGE)
    assert "2099-01-01 20:00 UTC to 2099-01-01 22:00 UTC: move" in page.text
    admin.get(PAGE)
    bad = admin.post(f"{PAGE}/outage/windows", {"start": "2099-01-01 22:00", "end": "2099-01-01 20:00"})
    assert bad.status == 400 and "end must come after the start" in bad.text
    admin.get(PAGE)
    fields = {"start": repr(window.start), "end": repr(window.end), "reason": "move"}
    assert admin.post(f"{PAGE}/outage/windows/remove", fields).status == 303
    assert read_windows(spool_state, "example.com") == []
    assert _actions(server) == ["outage_schedule", "outage_unschedule"]
