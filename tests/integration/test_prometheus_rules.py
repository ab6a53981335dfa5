"""contrib/prometheus/: the alert rules pass Prometheus' own checker, and its rule unit tests
prove each alert fires when it should and not before (`promtool`, Debian package prometheus,
which scripts/test installs)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CONTRIB = Path(__file__).resolve().parents[2] / "contrib" / "prometheus"


def promtool(*args: str) -> str:
    tool = shutil.which("promtool")
    assert tool is not None, "promtool is missing: apt-get install prometheus (scripts/test does)"
    done = subprocess.run([tool, *args], cwd=CONTRIB, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_the_rules_are_valid():
    assert "SUCCESS: 6 rules found" in promtool("check", "rules", "rules.yml")


def test_each_alert_fires_when_it_should():
    assert "SUCCESS" in promtool("test", "rules", "tests.yml")
