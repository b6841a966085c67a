"""The service Dockerfiles install only what the service imports, pinned as requirements.txt pins it,
generate the stubs as `make protos` does, and start the entry point the tests start.

There is no Docker engine here: the checks read the Dockerfiles, run their protoc step and import the
code laid out as the image lays it out.
"""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from k8s_manifests import REPO_ROOT, container, find, render

SERVICES = ("gateway", "preprocess")
NEVER = {"torch", "torchvision", "nvidia-pytriton", "onnxruntime", "onnx", "grpcio-tools", "opencv-python"}
FIRST_PARTY = {"services", "shopvision"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()


def dockerfile(service: str) -> str:
    return (REPO_ROOT / "services" / service / "Dockerfile").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def arg_default(text: str, name: str) -> str:
    values = [args.split("=", 1)[1].strip('"') for op, args in instructions(text)
              if op == "ARG" and args.startswith(f"{name}=")]
    assert len(values) == 1, f"ARG {name} with a default"
    return values[0]


def pins(requirements: Path) -> dict[str, str]:
    found = {}
    for line in requirements.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            found[name] = version
    return found


def copied_packages(text: str) -> list[str]:
    """Destination folders of ``COPY services/<pkg> /app/services/<pkg>``."""
    return [m for op, args in instructions(text) if op == "COPY" and not args.startswith("--from")
            for m in re.findall(r"^services/(\w+) /app/services/\1$", args)]


def third_party_imports(paths: list[Path]) -> set[str]:
    """Dotted names of the non-stdlib, non-first-party modules the files import."""
    modules = set()
    for path in paths:
        for file in path.rglob("*.py") if path.is_dir() else [path]:
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules |= {imported_module(node.module, alias.name) for alias in node.names}
    return {m for m in modules if m.split(".")[0] not in (*sys.stdlib_module_names, *FIRST_PARTY, "__future__")}


def imported_module(package: str, name: str) -> str:
    """The module ``from package import name`` loads: ``package.name`` when that is a module (``from
    opentelemetry import trace``: the namespace package alone has as many owners as it has distributions)."""
    if package.split(".")[0] in (*sys.stdlib_module_names, *FIRST_PARTY, "__future__"):
        return package
    try:
        return f"{package}.{name}" if importlib.util.find_spec(f"{package}.{name}") is not None else package
    except (ImportError, ValueError):  # ``package`` itself is not importable here, or ``name`` is no module
        return package


def distributions(modules: set[str]) -> set[str]:
    """The installed distributions that provide ``modules`` (namespace packages such as ``google``
    are resolved by the files each candidate distribution ships)."""
    owners = importlib.metadata.packages_distributions()
    found = set()
    for module in modules:
        candidates = owners.get(module.split(".")[0], [])
        assert candidates, f"no installed distribution provides {module}"
        if len(candidates) > 1:
            prefix = module.replace(".", "/")
            candidates = [d for d in candidates if any(
                str(f).startswith((prefix + "/", prefix + ".")) for f in importlib.metadata.files(d) or [])]
        assert len(candidates) == 1, f"{module}: provided by {candidates}"
        found.add(canonical(candidates[0]))
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_image_installs_exactly_the_serving_dependencies(service: str) -> None:
    text = dockerfile(service)
    packages = arg_default(text, "SERVING_PACKAGES").split()
    serving = pins(REPO_ROOT / "requirements.txt")
    for package in packages:
        assert package in serving, f"{package} has no exact pin in requirements.txt"
    installed = {canonical(p) for p in packages}
    assert not installed & NEVER
    code = [REPO_ROOT / "services" / p for p in copied_packages(text)]
    stubs = sorted((REPO_ROOT / "gen" / "shopvision").rglob("*_pb2*.py"))
    assert stubs, "gen/ is empty: run `make protos`"
    needed = distributions(third_party_imports(code + stubs))
    assert installed == needed, f"install {sorted(needed - installed)}, drop {sorted(installed - needed)}"
    # Nothing else reaches the runtime stage: requirements files are read in the build stage only.
    runtime = text.split("AS runtime", 1)[1]
    assert "pip install" not in runtime and "requirements" not in runtime


def pin_lookup(text: str) -> str:
    """The build stage's shell loop that writes serving.txt from requirements.txt."""
    runs = [args for op, args in instructions(text) if op == "RUN" and "$SERVING_PACKAGES" in args]
    assert len(runs) == 1
    return runs[0][:runs[0].index("> serving.txt;") + len("> serving.txt")]


@pytest.mark.parametrize("service", SERVICES)
def test_build_stage_finds_the_exact_pin_of_every_package(service: str, tmp_path: Path) -> None:
    """Run the Dockerfile's lookup (awk on NAME==VERSION lines): names with extras, such as psycopg[binary],
    must match their requirements line exactly, and a package without a pin must fail the build."""
    text = dockerfile(service)
    packages = arg_default(text, "SERVING_PACKAGES").split()
    shutil.copy(REPO_ROOT / "requirements.txt", tmp_path)
    script = pin_lookup(text)
    result = subprocess.run(["sh", "-c", script], cwd=tmp_path, env={**os.environ, "SERVING_PACKAGES": " ".join(
        packages)}, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    serving = pins(REPO_ROOT / "requirements.txt")
    assert (tmp_path / "serving.txt").read_text().splitlines() == [f"{p}=={serving[p]}" for p in packages]
    missing = subprocess.run(["sh", "-c", script], cwd=tmp_path, env={**os.environ, "SERVING_PACKAGES": "psycopg"},
                             capture_output=True, text=True, timeout=30, check=False)
    assert missing.returncode != 0 and "psycopg has no exact pin" in missing.stderr


@pytest.mark.parametrize("service", SERVICES)
def test_image_runs_the_entry_point_as_the_pod_user(service: str) -> None:
    text = dockerfile(service)
    ops = instructions(text)
    cmd = [args for op, args in ops if op == "CMD"]
    assert cmd == [f'["python", "-m", "services.{service}"]']
    assert (REPO_ROOT / "services" / service / "__main__.py").is_file()
    # devstack/stack.py, which every integration test uses, starts the same module.
    assert '[sys.executable, "-m", f"services.{name}"]' in (REPO_ROOT / "devstack" / "stack.py").read_text()
    user = [args for op, args in ops if op == "USER"]
    assert len(user) == 1 and re.fullmatch(r"[1-9]\d*:[1-9]\d*", user[0]), "numeric non-root USER"
    for overlay in ("cpu", "gpu"):
        deployment = find(render(overlay), "Deployment", service)
        pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
        assert f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}" == user[0]
        c = container(deployment)
        assert c["image"].startswith(f"shopvision-{service}:")
        exposed = {int(p) for op, args in ops if op == "EXPOSE" for p in args.split()}
        assert exposed == {p["containerPort"] for p in c["ports"]}


@pytest.mark.parametrize("service", SERVICES)
def test_base_image_is_pinned_by_digest(service: str) -> None:
    text = dockerfile(service)
    base = arg_default(text, "PYTHON_IMAGE")
    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", base), base
    assert f"{sys.version_info.major}.{sys.version_info.minor}" == "3.11", "the image's Python is the venv's"
    froms = [args for op, args in instructions(text) if op == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]
    assert text.splitlines()[0] == "# syntax=docker/dockerfile:1"


def protoc_command(text: str) -> list[str]:
    runs = [args for op, args in instructions(text) if op == "RUN" and "grpc_tools.protoc" in args]
    assert len(runs) == 1
    step = next(part for part in runs[0].split("&&") if "grpc_tools.protoc" in part)
    return shlex.split(step)


@pytest.mark.parametrize("service", SERVICES)
def test_stub_generation_matches_make_protos(service: str, tmp_path: Path) -> None:
    """Run the Dockerfile's protoc step here; its output must equal gen/ from `make protos`."""
    argv = protoc_command(dockerfile(service))
    assert argv[:3] == ["/opt/tools/bin/python", "-m", "grpc_tools.protoc"]
    out = tmp_path / "gen"
    out.mkdir()
    args = [a.replace("/gen", str(out)) for a in argv[3:]]
    protos = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "protos").rglob("*.proto"))
    args = [a for a in args if a != "protos/shopvision/v1/*.proto"] + protos
    result = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", *args], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    generated = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    made = {p.relative_to(REPO_ROOT / "gen"): p.read_bytes() for p in (REPO_ROOT / "gen").rglob("*")
            if p.is_file() and p.suffix in (".py", ".pyi") and p.name != "__init__.py" and "__pycache__" not in p.parts}
    assert generated == made


@pytest.mark.parametrize("service", SERVICES)
def test_code_copied_into_the_image_imports_alone(service: str, tmp_path: Path) -> None:
    """Lay out /app as the runtime stage does; the server module imports with nothing else of the repo."""
    text = dockerfile(service)
    app = tmp_path / "app"
    (app / "services").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "services" / "__init__.py", app / "services")
    for package in copied_packages(text):
        shutil.copytree(REPO_ROOT / "services" / package, app / "services" / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO_ROOT / "gen", app / "gen", ignore=shutil.ignore_patterns("__pycache__", ".stamp"))
    env = {**os.environ, "PYTHONPATH": f"{app}:{app / 'gen'}", "PYTHONDONTWRITEBYTECODE": "1"}
    probe = (f"import services.{service}.server, services.{service}.__main__, services; "
             f"assert services.__file__.startswith({str(app)!r}), services.__file__")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    ignore = (REPO_ROOT / "services" / service / "Dockerfile.dockerignore").read_text().splitlines()
    assert f"!services/{service}/" in ignore and "*" in ignore
