"""The monitoring and custom-metrics components agree with the observability files and the code:
dashboards shipped byte for byte, PrometheusRule = the rule file, job names, metric names."""
from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import pytest
import yaml
from k8s_manifests import DEFAULT_COMPONENTS, K8S, REPO_ROOT, find, labels_match, load_tool, of_kind, render

from devstack.prometheus_local import JOBS

MONITORING = K8S / "components" / "monitoring"
DASHBOARDS = MONITORING / "dashboards"
RULES = MONITORING / "rules" / "shopvision.rules.yml"
ADAPTER_VALUES = K8S / "components" / "custom-metrics" / "prometheus-adapter-values.yaml"
# Services of the namespace with nothing to scrape: selected by the ServiceMonitor, but without a metrics
# port prometheus-operator makes no target for them.
UNSCRAPED = {"postgres"}


def with_monitoring(overlay: str = "cpu") -> list[dict]:
    return render(overlay, ("monitoring",))


def test_rule_file_exists_with_rule_groups() -> None:
    assert RULES.is_file(), (f"{RULES.relative_to(REPO_ROOT)} is missing: the observability work delivers it "
                             "(Prometheus rule-file format); the PrometheusRule is generated from it")
    groups = yaml.safe_load(RULES.read_text())["groups"]
    assert groups and all(group["rules"] for group in groups)


def test_generated_files_are_in_sync() -> None:
    """`make sync-monitoring` has been run after the last change to dashboards/ or rules/."""
    tool = load_tool("sync_monitoring")
    assert tool.main(argparse.Namespace(component=MONITORING, check=True)) == 0, \
        "deploy/k8s/components/monitoring is stale: run `make sync-monitoring`"


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_prometheus_rule_is_the_rule_file(overlay: str) -> None:
    rules = of_kind(with_monitoring(overlay), "PrometheusRule")
    assert len(rules) == len(list((MONITORING / "rules").glob("*.rules.yml"))) >= 1
    rule = find(rules, "PrometheusRule", "shopvision")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_dashboard_config_maps_are_the_json_files(overlay: str) -> None:
    files = sorted(DASHBOARDS.glob("*.json"))
    maps = [o for o in of_kind(with_monitoring(overlay), "ConfigMap")
            if o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert len(maps) == len(files)
    by_key = {key: value for m in maps for key, value in m["data"].items()}
    for file in files:
        assert file.name in by_key, f"{file.name} is not shipped: run `make sync-monitoring`"
        assert by_key[file.name].encode() == file.read_bytes(), f"{file.name} differs from its ConfigMap"
        assert len(file.read_bytes()) < 1024 * 1024, f"{file.name} exceeds the 1 MiB ConfigMap limit"
    for m in maps:
        assert len(m["data"]) == 1
        # A fixed name: the Grafana sidecar would otherwise keep every old version.
        assert m["metadata"]["name"] == "shopvision-dashboard-" + re.sub(
            r"[^a-z0-9]+", "-", Path(next(iter(m["data"]))).stem.lower()).strip("-")


def test_service_monitor_scrapes_every_job_the_dashboards_use() -> None:
    objects = render("cpu", DEFAULT_COMPONENTS)
    monitor = find(objects, "ServiceMonitor", "shopvision")
    selected = [s for s in of_kind(objects, "Service")
                if labels_match(monitor["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
    # prometheus-operator names the job after the Service (no jobLabel override).
    assert "jobLabel" not in monitor["spec"]
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    scraped = {s["metadata"]["name"] for s in selected if ports <= {p["name"] for p in s["spec"]["ports"]}}
    # One Service per job: a second one over the same pods (a headless twin) would scrape them twice.
    assert scraped == set(JOBS)
    assert {s["metadata"]["name"] for s in selected} - scraped == UNSCRAPED
    rule = find(objects, "PrometheusRule", "shopvision")
    assert monitor["metadata"]["labels"]["release"] == rule["metadata"]["labels"]["release"]


def gauges(service: str) -> set[str]:
    return set(re.findall(r'Gauge\(\s*"([a-z0-9_]+)"', (REPO_ROOT / "services" / service / "metrics.py").read_text()))


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_custom_metrics_exist_and_the_adapter_serves_them(overlay: str) -> None:
    objects = render(overlay, ("monitoring", "custom-metrics"))
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    served = {rule["name"]["as"] for rule in adapter}
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        service = hpa["spec"]["scaleTargetRef"]["name"]
        custom = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert custom, f"HPA {service} has no custom metric"
        for name in custom:
            assert name in gauges(service), f"{name} is not a gauge of services/{service}/metrics.py"
            assert name in served, f"prometheus-adapter-values.yaml does not serve {name}"
    for rule in adapter:
        assert rule["seriesQuery"].startswith(rule["name"]["as"] + "{")


def test_gateway_in_flight_target_is_below_its_admission_limit() -> None:
    objects = render("cpu", ("custom-metrics",))
    env = find(objects, "ConfigMap", next(o["metadata"]["name"] for o in of_kind(objects, "ConfigMap")
                                          if o["metadata"]["name"].startswith("gateway-env")))["data"]
    hpa = find(objects, "HorizontalPodAutoscaler", "gateway")
    target = next(m["pods"]["target"]["averageValue"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods")
    assert 0 < float(target) < int(env["GATEWAY_MAX_IN_FLIGHT"])


def make_component(tmp_path: Path, dashboards: dict[str, str], rules: str | None) -> Path:
    component = tmp_path / "monitoring"
    (component / "dashboards").mkdir(parents=True)
    (component / "rules").mkdir()
    shutil.copy(MONITORING / "servicemonitor.yaml", component)
    for name, text in dashboards.items():
        (component / "dashboards" / name).write_text(text)
    if rules is not None:
        (component / "rules" / "shopvision.rules.yml").write_text(rules)
    return component


@pytest.mark.parametrize("count", [0, 1, 3])
def test_sync_ships_any_number_of_dashboards(tmp_path: Path, count: int) -> None:
    dashboards = {f"Shop Vision_{i}.json": f'{{"title": "d{i}", "panels": []}}\n' for i in range(count)}
    rules = ("# comment kept\ngroups:\n  - name: g\n    rules:\n      - record: a:b\n"
             "        expr: |\n          sum(up)\n")
    component = make_component(tmp_path, dashboards, rules)
    tool = load_tool("sync_monitoring")
    assert tool.main(argparse.Namespace(component=component, check=True)) == 1  # nothing generated yet
    assert tool.main(argparse.Namespace(component=component, check=False)) == 0
    assert tool.main(argparse.Namespace(component=component, check=True)) == 0
    text = load_tool("render").render("cpu", [str(component)])
    objects = [d for d in yaml.safe_load_all(text) if d]
    maps = [o for o in of_kind(objects, "ConfigMap") if o["metadata"].get("labels", {}).get("grafana_dashboard")]
    assert sorted(k for m in maps for k in m["data"]) == sorted(dashboards)
    assert {m["metadata"]["name"] for m in maps} == {f"shopvision-dashboard-shop-vision-{i}" for i in range(count)}
    assert find(objects, "PrometheusRule", "shopvision")["spec"] == yaml.safe_load(rules)
    # A new dashboard makes the component stale until the next sync.
    (component / "dashboards" / "new.json").write_text("{}")
    assert tool.main(argparse.Namespace(component=component, check=True)) == 1


def test_sync_fails_clearly_without_a_rule_file(tmp_path: Path) -> None:
    tool = load_tool("sync_monitoring")
    with pytest.raises(tool.SyncError, match="shopvision.rules.yml"):
        tool.render(make_component(tmp_path, {}, None))
    with pytest.raises(tool.SyncError, match="groups"):
        tool.render(make_component(tmp_path / "bad", {}, "rules: []\n"))
