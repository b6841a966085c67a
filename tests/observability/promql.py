"""Pull the PromQL out of dashboards and rule files, fill in Grafana variables, and check it has data."""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devstack.prometheus_local import LocalPrometheus, PrometheusError
from tools.dashboards import GPU_ONLY, OUT_DIR

DASHBOARD_FILES = sorted(OUT_DIR.glob("*.json"))
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right", "inf", "nan"}
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
# A metric name (not a function: no "(" after it), optionally with its {matchers}; a token start only.
_SELECTOR = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*+)\s*+(\{[^}]*\})?(?!\s*\()")
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*(\w+)\)$", re.S)


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref_id: str
    expr: str
    gpu_only: bool

    @property
    def name(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref_id}"


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in DASHBOARD_FILES}


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for item in dashboard.get("panels", []):
        yield item
        yield from item.get("panels", [])


def panel_queries(name: str, dashboard: dict[str, Any]) -> Iterator[PanelQuery]:
    for item in all_panels(dashboard):
        gpu_only = str(item.get("description", "")).startswith(GPU_ONLY)
        for target in item.get("targets", []):
            yield PanelQuery(name, item["title"], target["refId"], target["expr"], gpu_only)


def selectors(expr: str) -> list[str]:
    """The vector selectors of ``expr`` (``name{...}`` or a bare ``name``), in order, without duplicates."""
    stripped = _GROUPING.sub(" ", _RANGE.sub(" ", expr))
    found = []
    # Matchers hold strings; hide them while finding names so a label value never looks like a metric.
    masked = _STRING.sub(lambda m: '"' + "x" * (len(m.group()) - 2) + '"', stripped)
    for match in _SELECTOR.finditer(masked):
        name = match.group(1)
        if name.lower() in KEYWORDS:
            continue
        braces = stripped[match.start(2):match.end(2)] if match.group(2) else ""
        selector = name + braces
        if selector not in found:
            found.append(selector)
    return found


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana's ``$var`` / ``${var}`` with ``values``; an unknown variable is an error."""
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for dashboard variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def variable_values(prometheus: LocalPrometheus, dashboard: dict[str, Any], rate_window: str) -> dict[str, str]:
    """What Grafana would put in each variable: the first value of single-value variables,
    "All" (every value, as a regex alternation) of multi-value ones; the built-in intervals as ``rate_window``."""
    values = {"__rate_interval": rate_window, "__interval": rate_window, "__range": rate_window}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "datasource":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = _LABEL_VALUES.match(query.strip())
        if match is None:
            raise ValueError(f"variable {variable['name']}: only label_values(selector, label) is supported")
        selector, label = substitute(match.group(1), values), match.group(2)
        found = sorted(prometheus.api(f"label/{label}/values", **{"match[]": selector}))
        if not found:
            raise AssertionError(f"variable ${variable['name']} ({query}) has no values")
        if variable.get("multi") or variable.get("includeAll"):
            values[variable["name"]] = "(" + "|".join(re.escape(v) for v in found) + ")"
        else:
            values[variable["name"]] = found[0]
    return values


def problems(prometheus: LocalPrometheus, expr: str) -> list[str]:
    """Why ``expr`` does not show data: a query error, no series, only NaN, or a selector matching nothing.

    Each selector is checked on its own too, so a misspelt metric hidden behind ``or`` or ``and``
    still fails.
    """
    try:
        result = prometheus.query(expr)
    except PrometheusError as error:
        return [f"query failed: {error}"]
    found = []
    if not result:
        found.append("no series")
    elif not any(math.isfinite(float(sample["value"][1])) for sample in result):
        found.append("only NaN/Inf values")
    for selector in selectors(expr):
        try:
            if not prometheus.query(selector):
                found.append(f"selector {selector} matches no series")
        except PrometheusError as error:
            found.append(f"selector {selector} failed: {error}")
    return found


def rule_groups(prometheus: LocalPrometheus) -> list[dict[str, Any]]:
    return prometheus.api("rules")["groups"]


def rules_file_names(path: Path) -> tuple[set[str], set[str]]:
    """Names of the recording rules and alerts in a rule file (line-based: `- record:` / `- alert:`)."""
    text = path.read_text()
    return (set(re.findall(r"^\s*- record:\s*(\S+)", text, re.M)),
            set(re.findall(r"^\s*- alert:\s*(\S+)", text, re.M)))
