"""The Grafana dashboard JSON: generated from tools/dashboards.py, and importable into any Grafana.

Grafana itself cannot be installed here, so the structure it relies on is checked instead.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.observability.promql import (
    DASHBOARD_FILES,
    all_panels,
    load_dashboards,
    panel_queries,
    selectors,
    substitute,
)
from tools import dashboards

DASHBOARDS = load_dashboards()


def walk(node: Any, path: str = "") -> Any:
    """(path, key, value) of every dict entry, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def test_the_four_dashboards_exist() -> None:
    assert set(DASHBOARDS) == {"overview.json", "triton-models.json", "preprocess.json", "capacity.json"}


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_committed_json_is_the_generator_output(path) -> None:
    assert path.read_text() == dashboards.to_json(dashboards.DASHBOARDS[path.name]), \
        "run `make dashboards` after editing tools/dashboards.py, and do not edit the JSON by hand"


def test_check_mode_reports_a_stale_file(tmp_path, capsys) -> None:
    args = dashboards.get_args_parser().parse_args(["--out-dir", str(tmp_path)])
    assert dashboards.main(args) == 0
    (tmp_path / "overview.json").write_text("{}\n")
    assert dashboards.main(dashboards.get_args_parser().parse_args(["--out-dir", str(tmp_path), "--check"])) == 1
    assert "overview.json" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_structure(name: str) -> None:
    board = DASHBOARDS[name]
    assert board["schemaVersion"] >= 36, "Grafana 9+ schema"
    assert board["uid"].startswith("shopvision-") and len(board["uid"]) <= 40
    assert "shopvision" in board["tags"]
    assert board.get("id") is None, "an id would clash on import"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["namespace"]["type"] == "query"

    panels = list(all_panels(board))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {name}"
    titles = [p["title"] for p in panels if p["type"] != "row"]
    assert len(titles) == len(set(titles)), f"duplicate panel titles in {name}"
    for item in panels:
        grid = item["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, item["title"]
        if item["type"] == "row":
            continue
        assert item["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, item["title"]
        assert item["targets"], f"{item['title']} has no query"
        ref_ids = [t["refId"] for t in item["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), item["title"]
        for target in item["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, item["title"]
        assert item["fieldConfig"]["defaults"].get("unit"), f"{item['title']} has no unit"

    # Panels must not overlap on the 24-column grid.
    cells: dict[tuple[int, int], str] = {}
    for item in panels:
        grid = item["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{item['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = item["title"]


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_no_hard_coded_datasource(name: str) -> None:
    for path, key, value in walk(DASHBOARDS[name]):
        if key == "datasource" and isinstance(value, dict) and "uid" in value:
            assert value["uid"] == "${datasource}", f"{path}: hard-coded data source uid {value['uid']!r}"
        if key == "datasource" and isinstance(value, str):
            assert value in ("${datasource}", "prometheus"), f"{path}: data source {value!r}"
    assert "DS_PROMETHEUS" not in str(DASHBOARDS[name]), "use the ${datasource} variable, not __inputs"


@pytest.mark.parametrize("query", [q for name, board in sorted(DASHBOARDS.items()) for q in panel_queries(name, board)],
                         ids=lambda q: q.name)
def test_every_query_is_scoped_to_the_namespace(query) -> None:
    """Each selector names a metric and filters on $namespace, so the live test checks every metric."""
    found = selectors(query.expr)
    assert found, f"no metric in {query.expr}"
    for selector in found:
        assert re.match(r"^[a-zA-Z_:][\w:]*\{", selector), f"bare selector {selector!r}"
        assert 'namespace="$namespace"' in selector, f"{selector} does not filter on $namespace"
    if "$model" in query.expr:
        assert "model" in {v["name"] for v in DASHBOARDS[query.dashboard]["templating"]["list"]}


def test_template_variables_where_models_matter() -> None:
    triton = {v["name"]: v for v in DASHBOARDS["triton-models.json"]["templating"]["list"]}
    assert triton["model"]["multi"] and triton["model"]["includeAll"]
    assert "$namespace" in triton["model"]["query"]["query"]


def test_gpu_only_panels_are_marked_and_query_only_gpu_metrics() -> None:
    gpu = [q for name, board in DASHBOARDS.items() for q in panel_queries(name, board) if q.gpu_only]
    assert {q.panel for q in gpu} == {"GPU utilisation", "GPU memory used", "GPU power"}
    for query in gpu:
        for selector in selectors(query.expr):
            assert selector.split("{")[0] in dashboards.TRITON_GPU_METRICS, query.name
    not_marked = [q for name, board in DASHBOARDS.items() for q in panel_queries(name, board) if not q.gpu_only]
    for query in not_marked:
        assert not any(s.startswith("nv_gpu_") for s in selectors(query.expr)), \
            f"{query.name} reads GPU metrics without the {dashboards.GPU_ONLY!r} marker"


# The gateway's model-lifecycle metrics (issue 18), each plotted in the "Model lifecycle" row.
LIFECYCLE_METRICS = {
    "shopvision_gateway_rollout_requests_total", "shopvision_gateway_rollout_errors_total",
    "shopvision_gateway_rollout_request_duration_seconds_bucket", "shopvision_gateway_shadow_agreement_total",
    "shopvision_gateway_shadow_dropped_total", "shopvision_gateway_predictions_total",
    "shopvision_gateway_top1_score_bucket", "shopvision_gateway_input_megapixels_bucket",
    "shopvision_gateway_input_aspect_ratio_bucket", "shopvision_gateway_input_brightness_total",
    "shopvision_gateway_drift_psi", "shopvision_gateway_drift_window_samples", "shopvision_gateway_feedback_total",
}


def row_panels(board: dict[str, Any], title: str) -> list[dict[str, Any]]:
    """The panels under the row called ``title`` (rows are not collapsed: they follow it at the top level)."""
    found, inside = [], False
    for item in board["panels"]:
        if item["type"] == "row":
            inside = item["title"] == title
        elif inside:
            found.append(item)
    return found


def test_model_lifecycle_row_plots_every_lifecycle_metric() -> None:
    board = DASHBOARDS["triton-models.json"]
    panels = row_panels(board, "Model lifecycle")
    plotted = {s.split("{")[0] for p in panels for t in p["targets"] for s in selectors(t["expr"])}
    assert plotted == LIFECYCLE_METRICS
    by_title = {p["title"]: p for p in panels}
    # Rollout panels split by version and role, so a candidate is seen beside the serving version.
    for title in ("Requests by version and role", "Error ratio by version and role",
                  "p99 inference time by version and role"):
        expr = by_title[title]["targets"][0]["expr"]
        assert "by (model, version, role" in expr and "$model" in expr, title
        assert by_title[title]["targets"][0]["legendFormat"] == "{{model}} v{{version}} {{role}}"
    # Ratios read 0, not "No data", while there are calls but no errors (or no agreeing shadow answers).
    assert " * 0) / " in by_title["Error ratio by version and role"]["targets"][0]["expr"]
    assert 'agree="true"' in by_title["Candidate agreement with serving"]["targets"][0]["expr"]
    psi = by_title["Drift (PSI against the validation reference)"]["targets"][0]["expr"]
    assert "by (model, version, signal)" in psi


def test_rollout_only_panels_are_marked_and_query_only_rollout_only_metrics() -> None:
    panels = [p for board in DASHBOARDS.values() for p in all_panels(board) if p["type"] != "row"]
    marked = {p["title"] for p in panels if p["description"].startswith(dashboards.ROLLOUT_ONLY)}
    assert marked == {"Candidate agreement with serving", "Comparisons dropped"}
    for item in panels:
        for target in item["targets"]:
            names = [s.split("{")[0] for s in selectors(target["expr"])]
            rollout_only = [n for n in names if n in dashboards.ROLLOUT_ONLY_METRICS]
            if item["title"] in marked:
                assert rollout_only == names, item["title"]
            else:
                assert not rollout_only, \
                    f"{item['title']} reads {rollout_only} without the {dashboards.ROLLOUT_ONLY!r} marker"


def test_every_query_parses(tmp_path: Path) -> None:
    """Each panel query, with its variables filled in, is valid PromQL for promtool (no Prometheus needed)."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: run `make deps` (Debian package prometheus)")
    values = {"namespace": "shop", "model": "(fashion_effnet|fashion_cnn)", "__rate_interval": "5m"}
    queries = [q for name, board in sorted(DASHBOARDS.items()) for q in panel_queries(name, board)]
    rules = [{"record": f"panel:query_{i}:check", "expr": substitute(q.expr, values)} for i, q in enumerate(queries)]
    (tmp_path / "panels.rules.yml").write_text(json.dumps({"groups": [{"name": "panels", "rules": rules}]}))
    result = subprocess.run([binary, "check", "rules", "panels.rules.yml"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
