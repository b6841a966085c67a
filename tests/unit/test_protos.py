"""The protos pass `buf lint` with buf.yaml, and `buf breaking` against the released API (protos/released/v1.binpb).

buf is the npm package pinned in package.json (`make buf`, which `make test` runs through `make setup`). The checks
are run on the real files, and once more on a copy with a deliberate breaking change or lint error, so a config that
checked nothing would fail here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "node_modules" / ".bin" / "buf"
RELEASED = ROOT / "protos" / "released" / "v1.binpb"
RECOGNITION = Path("protos/shopvision/v1/recognition.proto")

if not BUF.exists():
    message = f"{BUF.relative_to(ROOT)} is missing: run make buf"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)  # CI installs it (make setup): a missing buf there is a broken install
    pytest.skip(message, allow_module_level=True)


def buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A copy of buf.yaml and protos/ to change without touching the checkout."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not found once in {path}"
    path.write_text(text.replace(old, new))


def test_buf_lint_passes_on_the_protos() -> None:
    result = buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_still_applies_the_standard_rules(workspace: Path) -> None:
    edit(workspace / RECOGNITION, "uint32 top_k = 2;", "uint32 TopK = 2;")
    result = buf("lint", cwd=workspace)
    assert result.returncode != 0
    assert "TopK" in result.stdout and "lower_snake_case" in result.stdout, result.stdout


def test_lint_covers_both_proto_files() -> None:
    result = buf("ls-files")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == [
        "protos/shopvision/v1/preprocess.proto",
        "protos/shopvision/v1/recognition.proto",
    ]


def test_protos_are_backwards_compatible_with_the_released_api() -> None:
    result = buf("breaking", "protos", "--against", str(RELEASED))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_released_image_holds_the_public_service() -> None:
    """The image is the real released API, not an empty set that every change would be compatible with."""
    result = buf("build", str(RELEASED), "--exclude-source-info", "-o", "-#format=json")
    assert result.returncode == 0, result.stderr
    for name in ("ProductRecognition", "Preprocessor", "ClassifyRequest", "SearchSimilar", "IndexProduct"):
        assert f'"{name}"' in result.stdout, name


@pytest.mark.parametrize(
    ("old", "new", "reported"),
    [
        ("uint32 top_k = 2;", "uint32 top_k = 9;", 'Previously present field "2" with name "top_k"'),
        ("string model = 3;\n}", "int32 model = 3;\n}", 'changed type from "string" to "int32"'),
        (
            "  rpc ListModels(ListModelsRequest) returns (ListModelsResponse);\n",
            "",
            'Previously present RPC "ListModels"',
        ),
    ],
    ids=["renumbered-field", "retyped-field", "removed-rpc"],
)
def test_buf_breaking_fails_on_a_breaking_change(workspace: Path, old: str, new: str, reported: str) -> None:
    edit(workspace / RECOGNITION, old, new)
    result = buf("breaking", "protos", "--against", str(RELEASED), cwd=workspace)
    assert result.returncode != 0, "buf breaking accepted a breaking change"
    assert reported in result.stdout, result.stdout


def test_buf_breaking_accepts_an_added_field(workspace: Path) -> None:
    edit(workspace / RECOGNITION, "string model = 3;\n}", "string model = 3;\n  bool explain = 99;\n}")
    result = buf("breaking", "protos", "--against", str(RELEASED), cwd=workspace)
    assert result.returncode == 0, result.stdout + result.stderr
