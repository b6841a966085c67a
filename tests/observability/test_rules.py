"""The Prometheus rules: ``promtool check rules`` and the alert unit tests (``promtool test rules``).

Every ``*.rules.yml`` in the rules folder (each one becomes a PrometheusRule) has its unit tests beside it in
``*.rules.test.yml``; ``make rules-test`` runs the same checks.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from devstack.prometheus_local import RULES_FILE
from tests.observability.promql import rules_file_names

RULES_DIR = RULES_FILE.parent
RULE_FILES = sorted(RULES_DIR.glob("*.rules.yml"))
LIFECYCLE = RULES_DIR / "lifecycle.rules.yml"


def unit_tests_of(rules: Path) -> Path:
    return rules.with_name(rules.name.removesuffix(".rules.yml") + ".rules.test.yml")


def promtool(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: run `make deps` (Debian package prometheus)")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_the_rule_files() -> None:
    assert RULES_FILE in RULE_FILES and LIFECYCLE in RULE_FILES


@pytest.mark.parametrize("rules", RULE_FILES, ids=lambda p: p.name)
def test_rules_are_valid(rules: Path) -> None:
    result = promtool("check", "rules", "--lint=all", "--lint-fatal", rules.name)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("rules", RULE_FILES, ids=lambda p: p.name)
def test_alert_unit_tests_pass(rules: Path) -> None:
    assert unit_tests_of(rules).is_file(), f"{rules.name} has no unit tests ({unit_tests_of(rules).name})"
    result = promtool("test", "rules", unit_tests_of(rules).name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("rules", RULE_FILES, ids=lambda p: p.name)
def test_every_alert_has_a_unit_test(rules: Path) -> None:
    tests = unit_tests_of(rules)
    text = tests.read_text()
    assert re.search(rf"^\s*-\s*{re.escape(rules.name)}\s*$", text, re.M), f"{tests.name} loads another file"
    _, alerts = rules_file_names(rules)
    tested = set(re.findall(r"alertname:\s*(\S+)", text))
    assert alerts == tested, f"alerts without a unit test: {sorted(alerts - tested)}"


def test_the_expected_alerts_exist() -> None:
    alerts = set().union(*(rules_file_names(rules)[1] for rules in RULE_FILES))
    assert {"ShopvisionErrorBudgetBurnFast", "ShopvisionErrorBudgetBurnSlow", "ShopvisionClassifyLatencyHigh",
            "ShopvisionTritonQueueTimeHigh", "ShopvisionTargetDown", "ShopvisionCandidateWorse",
            "ShopvisionCandidateDisagreement", "ShopvisionModelDrift"} <= alerts


def test_alerts_say_what_to_do() -> None:
    """The lifecycle alerts name the command that inspects or ends the rollout."""
    text = LIFECYCLE.read_text()
    for command in ("python -m training.rollout status --model", "python -m training.rollout rollback --model"):
        assert command in text


@pytest.mark.parametrize(("rules", "mutation"), [
    (RULES_FILE, ("> (14.4 * 0.001)", "> (144 * 0.001)")),  # fast burn threshold ten times too lax
    (RULES_FILE, ('code=~"UNKNOWN|INTERNAL|UNAVAILABLE|', 'code=~"INVALID_ARGUMENT|UNKNOWN|INTERNAL|UNAVAILABLE|')),
    (RULES_FILE, ('up{job=~"gateway|preprocess|triton"} == 0', 'up{job=~"gateway|triton"} == 0')),
    (RULES_FILE, ("rate(nv_inference_queue_duration_us[5m])) / 1e6",
                  "rate(nv_inference_queue_duration_us[5m])) / 1e3")),
    (LIFECYCLE, ("0.02 + namespace_model_role:", "0 + namespace_model_role:")),  # no margin over serving
    (LIFECYCLE, ('p99_rate5m{role=~"canary|shadow"}', 'p99_rate5m{role="canary"}')),  # shadows never compared
    (LIFECYCLE, ("requests:rate5m >= 1", "requests:rate5m >= 0")),  # any trickle of calls judged
    (LIFECYCLE, ('p99_rate5m{role="serving"}, 0.025)', 'p99_rate5m{role="serving"}, 0)')),  # no latency floor
    (LIFECYCLE, ("group_left\n              0.02 + namespace_model_role:shopvision_gateway_rollout_errors:ratio_rate5m",
                 "group_left\n              0.02 + namespace_model_version_role:shopvision_gateway_rollout_errors:"
                 "ratio_rate5m")),  # a per-version baseline: no longer evaluates while two versions serve
    (LIFECYCLE, ("  ) > 0.25\n", "  ) > 0.01\n")),  # the reference distribution fires
    (LIFECYCLE, ("drift_window_samples >= 500", "drift_window_samples >= 0")),  # small windows judged
    (LIFECYCLE, ("ratio_rate5m < 0.5", "ratio_rate5m < 0.9")),  # normal disagreement fires
], ids=["burn-threshold", "client-errors-counted", "target-forgotten", "queue-unit", "no-error-margin",
        "shadow-latency-ignored", "no-minimum-rate", "no-latency-floor", "baseline-per-version", "psi-threshold",
        "no-minimum-samples", "agreement-threshold"])
def test_unit_tests_catch_a_broken_rule(tmp_path: Path, rules: Path, mutation: tuple[str, str]) -> None:
    """The unit tests are not vacuous: each of these plausible mistakes makes them fail."""
    old, new = mutation
    text = rules.read_text()
    assert old in text, old
    (tmp_path / rules.name).write_text(text.replace(old, new))
    shutil.copy(unit_tests_of(rules), tmp_path / unit_tests_of(rules).name)
    result = promtool("test", "rules", unit_tests_of(rules).name, cwd=tmp_path)
    assert result.returncode != 0, f"promtool test rules still passes with {new!r}"
