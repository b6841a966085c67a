"""The Prometheus rules: ``promtool check rules`` and the alert unit tests (``promtool test rules``)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from devstack.prometheus_local import RULES_FILE
from tests.observability.promql import rules_file_names

RULES_TESTS = RULES_FILE.with_name("shopvision.rules.test.yml")


def promtool(*args: str, cwd: Path = RULES_FILE.parent) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: run `make deps` (Debian package prometheus)")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_rules_are_valid() -> None:
    result = promtool("check", "rules", "--lint=all", "--lint-fatal", RULES_FILE.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULES_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test() -> None:
    _, alerts = rules_file_names(RULES_FILE)
    tested = set(re.findall(r"alertname:\s*(\S+)", RULES_TESTS.read_text()))
    assert alerts == tested, f"alerts without a unit test: {sorted(alerts - tested)}"
    assert {"ShopvisionErrorBudgetBurnFast", "ShopvisionErrorBudgetBurnSlow", "ShopvisionClassifyLatencyHigh",
            "ShopvisionTritonQueueTimeHigh", "ShopvisionTargetDown"} <= alerts


@pytest.mark.parametrize("mutation", [
    ("> (14.4 * 0.001)", "> (144 * 0.001)"),  # fast burn threshold ten times too lax
    ('code=~"UNKNOWN|INTERNAL|UNAVAILABLE|', 'code=~"INVALID_ARGUMENT|UNKNOWN|INTERNAL|UNAVAILABLE|'),  # caller errors
    ('up{job=~"gateway|preprocess|triton"} == 0', 'up{job=~"gateway|triton"} == 0'),  # preprocess forgotten
    ("rate(nv_inference_queue_duration_us[5m])) / 1e6", "rate(nv_inference_queue_duration_us[5m])) / 1e3"),
], ids=["burn-threshold", "client-errors-counted", "target-forgotten", "queue-unit"])
def test_unit_tests_catch_a_broken_rule(tmp_path: Path, mutation: tuple[str, str]) -> None:
    """The unit tests are not vacuous: each of these plausible mistakes makes them fail."""
    old, new = mutation
    text = RULES_FILE.read_text()
    assert old in text
    (tmp_path / RULES_FILE.name).write_text(text.replace(old, new))
    shutil.copy(RULES_TESTS, tmp_path / RULES_TESTS.name)
    result = promtool("test", "rules", RULES_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0, f"promtool test rules still passes with {new!r}"
