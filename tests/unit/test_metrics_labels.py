"""Counters that dashboards plot exist at 0 for every label value the code produces (services/*/metrics.py).

The reasons are read from the code itself (every ``InvalidInput(..., reason="...")``), so a new refusal reason
that is not initialised fails here, not on a dashboard that reads "No data".
"""
from __future__ import annotations

import ast
from pathlib import Path

from prometheus_client import REGISTRY, generate_latest

from services.gateway import metrics as gateway_metrics
from services.preprocess import metrics as preprocess_metrics
from tests.metrics_util import parse

REPO_ROOT = Path(__file__).resolve().parents[2]


def invalid_input_reasons(*paths: Path) -> set[str]:
    """The ``reason`` of every ``InvalidInput(...)`` raised in the files under ``paths``."""
    reasons = set()
    for path in paths:
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "InvalidInput":
                    reasons |= {k.value.value for k in node.keywords
                                if k.arg == "reason" and isinstance(k.value, ast.Constant)}
    return reasons


def exposed() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return parse(generate_latest(REGISTRY).decode())


def test_every_preprocess_refusal_reason_is_initialised() -> None:
    services = REPO_ROOT / "services"
    produced = invalid_input_reasons(services / "preprocess", services / "common" / "spec.py",
                                     services / "common" / "errors.py")
    assert produced == set(preprocess_metrics.REJECT_REASONS)
    samples = exposed()
    for reason in produced:
        assert ("shopvision_preprocess_rejected_total", (("reason", reason),)) in samples, reason
    for code in preprocess_metrics.CODES:
        assert ("shopvision_preprocess_requests_total", (("code", code),)) in samples, code


def test_every_upstream_error_series_is_initialised() -> None:
    samples = exposed()
    assert set(gateway_metrics.UPSTREAM_ERROR_CODES) == {"preprocess", "triton", "postgres"}
    for upstream, codes in gateway_metrics.UPSTREAM_ERROR_CODES.items():
        for code in codes:
            assert ("shopvision_gateway_upstream_errors_total",
                    (("code", code), ("upstream", upstream))) in samples, (upstream, code)
