"""Issue 12.6: a panel action is one log line (`web.admin_action`) and one audit line, never
with the password, in the text and the JSON format alike."""

from __future__ import annotations

import json
import logging

import pytest

from relay.log import JsonFormatter

pytestmark = pytest.mark.timeout(60)

ALICE = "/panel/domains/example.com/users/alice"
PASSWORD = "brand new pass 42"


def test_setting_a_password_in_the_panel_is_logged_once_without_it(server, admin, caplog):
    admin.get(ALICE)
    caplog.set_level(logging.INFO, logger="relay")
    reply = admin.post(ALICE, {"password": PASSWORD, "repeat": PASSWORD, "state": "active"})
    assert reply.status == 303
    actions = [r for r in caplog.records if r.getMessage().startswith("web.admin_action ")]
    assert len(actions) == 1 and " action=set_password " in actions[0].getMessage() + " "
    as_json = json.loads(JsonFormatter().format(actions[0]))
    assert (as_json["event"], as_json["action"], as_json["user"]) == (
        "web.admin_action", "set_password", "alice@example.com")
    every_line = [r.getMessage() for r in caplog.records]
    every_line += [JsonFormatter().format(r) for r in caplog.records]
    assert not [line for line in every_line if PASSWORD in line]
    audit = [line for line in server.audit_lines() if " action=set_password " in line]
    assert len(audit) == 1 and PASSWORD not in server.config.audit_log.read_text()
