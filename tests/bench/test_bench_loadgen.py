"""The Python load generator's command line: ghz's duration syntax, each ghz config run, JSON and plot written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import loadgen
from bench.harness.data import CALL
from bench.loadgen import parse_go_duration
from devstack.stack import REPO_ROOT, Stack


def test_go_durations():
    assert parse_go_duration("1m30s") == 90
    assert parse_go_duration("500ms") == pytest.approx(0.5)
    assert parse_go_duration(2_000_000_000) == 2
    with pytest.raises(ValueError):
        parse_go_duration("30")


@pytest.mark.stack
@pytest.mark.parametrize("config", sorted((REPO_ROOT / "bench" / "ghz").glob("*.json")), ids=lambda p: p.stem)
def test_cli_runs_each_ghz_config_and_writes_json_and_plot(stack: Stack, config: Path, tmp_path: Path):
    output, plot = tmp_path / "summary.json", tmp_path / "plot.png"
    args = loadgen.get_args_parser().parse_args([
        "--ghz-config", str(config), "--host", stack.gateway_address, "--total", "3", "--concurrency", "1,2",
        "--output", str(output), "--plot", str(plot)])
    loadgen.main(args)
    written = json.loads(output.read_text())
    runs = written if isinstance(written, list) else [written]
    rps_config = "rps" in json.loads(config.read_text())
    assert len(runs) == (1 if rps_config else 2)  # an rps config is one open-loop run; --concurrency sweeps
    for run in runs:
        assert run["count"] == 3 and run["statusCodeDistribution"] == {"OK": 3}
        assert run["tags"]["mode"] == ("open" if rps_config else "closed")
        assert run["options"]["call"] == CALL and run["options"]["host"] == stack.gateway_address
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
