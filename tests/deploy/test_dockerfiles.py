"""The one service Dockerfile (services/Dockerfile, ``--build-arg SERVICE=gateway|preprocess``) installs only what
the chosen service imports, pinned as requirements.txt pins it, generates the stubs as `make protos` does, and
starts the entry point the tests start.

There is no Docker engine here: the checks resolve the stages a build for each SERVICE goes through (BuildKit
substitutes the global ``SERVICE`` argument in ``FROM``), run their protoc step and import the code laid out as
that image lays it out.
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
from dataclasses import dataclass
from pathlib import Path

import pytest
from k8s_manifests import REPO_ROOT, container, find, render

SERVICES = ("gateway", "preprocess")
NEVER = {"torch", "torchvision", "nvidia-pytriton", "onnxruntime", "onnx", "grpcio-tools", "opencv-python"}
FIRST_PARTY = {"services", "shopvision"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()


DOCKERFILE = REPO_ROOT / "services" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def arg_default(ops: list[tuple[str, str]], name: str) -> str:
    values = [args.split("=", 1)[1].strip('"') for op, args in ops if op == "ARG" and args.startswith(f"{name}=")]
    assert len(values) == 1, f"ARG {name} with a default"
    return values[0]


def env_value(ops: list[tuple[str, str]], name: str) -> str:
    values = [args.split("=", 1)[1].strip('"') for op, args in ops if op == "ENV" and args.startswith(f"{name}=")]
    assert len(values) == 1, f"one ENV {name}"
    return values[0]


@dataclass
class Stage:
    name: str
    base: str
    ops: list[tuple[str, str]]


def stages(service: str) -> tuple[list[tuple[str, str]], list[Stage]]:
    """The global instructions (before the first FROM) and the stages, as a build with
    ``--build-arg SERVICE=<service>`` sees them."""
    text = DOCKERFILE.read_text()
    ops = instructions(text)
    assert ("ARG", "SERVICE") in ops[:next(i for i, (op, _) in enumerate(ops) if op == "FROM")], \
        "a global ARG SERVICE without a default"
    preamble: list[tuple[str, str]] = []
    found: list[Stage] = []
    for op, args in instructions(text.replace("${SERVICE}", service)):
        if op == "FROM":
            base, _, name = args.partition(" AS ")
            found.append(Stage(name.strip(), base.strip(), []))
        elif found:
            found[-1].ops.append((op, args))
        else:
            preamble.append((op, args))
    return preamble, found


def chain(service: str, target: str | None = None) -> list[Stage]:
    """The stages the ``target`` stage (default: the last one, the image) is built on, base first."""
    _, all_stages = stages(service)
    by_name = {stage.name: stage for stage in all_stages if stage.name}
    stage = by_name[target] if target else all_stages[-1]
    path = [stage]
    while stage.base in by_name:
        stage = by_name[stage.base]
        path.insert(0, stage)
    return path


def image_ops(service: str) -> list[tuple[str, str]]:
    """Instructions of the image a build for ``service`` produces (the runtime stages, not the build stage)."""
    return [op for stage in chain(service) for op in stage.ops]


def build_ops(service: str) -> list[tuple[str, str]]:
    return [op for stage in chain(service, "build") for op in stage.ops]


def serving_packages(service: str) -> list[str]:
    return env_value(build_ops(service), "SERVING_PACKAGES").split()


def pins(requirements: Path) -> dict[str, str]:
    found = {}
    for line in requirements.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            found[name] = version
    return found


def copied_packages(ops: list[tuple[str, str]]) -> list[str]:
    """Destination folders of ``COPY services/<pkg> /app/services/<pkg>``."""
    return [m for op, args in ops if op == "COPY" and not args.startswith("--from")
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
    packages = serving_packages(service)
    serving = pins(REPO_ROOT / "requirements.txt")
    for package in packages:
        assert package in serving, f"{package} has no exact pin in requirements.txt"
    installed = {canonical(p) for p in packages}
    assert not installed & NEVER
    copied = copied_packages(image_ops(service))
    assert copied == ["common", service], copied
    code = [REPO_ROOT / "services" / p for p in copied]
    stubs = sorted((REPO_ROOT / "gen" / "shopvision").rglob("*_pb2*.py"))
    assert stubs, "gen/ is empty: run `make protos`"
    needed = distributions(third_party_imports(code + stubs))
    assert installed == needed, f"install {sorted(needed - installed)}, drop {sorted(installed - needed)}"
    # Nothing else reaches the runtime stage: requirements files are read in the build stage only.
    runtime = " ".join(args for _, args in image_ops(service))
    assert "pip install" not in runtime and "requirements" not in runtime and "SERVING_PACKAGES" not in runtime


def pin_lookup(service: str) -> str:
    """The build stage's shell loop that writes serving.txt from requirements.txt."""
    runs = [args for op, args in build_ops(service) if op == "RUN" and "$SERVING_PACKAGES" in args]
    assert len(runs) == 1
    return runs[0][:runs[0].index("> serving.txt;") + len("> serving.txt")]


@pytest.mark.parametrize("service", SERVICES)
def test_build_stage_finds_the_exact_pin_of_every_package(service: str, tmp_path: Path) -> None:
    """Run the Dockerfile's lookup (awk on NAME==VERSION lines): names with extras, such as psycopg[binary],
    must match their requirements line exactly, and a package without a pin must fail the build."""
    packages = serving_packages(service)
    shutil.copy(REPO_ROOT / "requirements.txt", tmp_path)
    script = pin_lookup(service)
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
    ops = image_ops(service)
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
    preamble, _ = stages(service)
    base = arg_default(preamble, "PYTHON_IMAGE")
    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", base), base
    assert f"{sys.version_info.major}.{sys.version_info.minor}" == "3.11", "the image's Python is the venv's"
    # Both the build stage and the image start from that base, through the service's own stages.
    assert chain(service, "build")[0].base == chain(service)[0].base == "${PYTHON_IMAGE}"
    assert [stage.name for stage in chain(service, "build")] == [f"packages-{service}", "build"]
    assert [stage.name for stage in chain(service)] == ["runtime", f"runtime-{service}", ""]
    assert DOCKERFILE.read_text().splitlines()[0] == "# syntax=docker/dockerfile:1"


def test_each_service_has_its_stages_and_make_images_builds_each_from_this_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    for kind in ("packages", "runtime"):
        assert set(re.findall(rf"^FROM \S+ AS {kind}-(\w+)$", text, re.MULTILINE)) == set(SERVICES), kind
    assert not list((REPO_ROOT / "services").glob("*/Dockerfile")), "one Dockerfile: services/Dockerfile"
    dry_run = subprocess.run(["make", "-n", "images", "REGISTRY=registry.example", "TAG=t", "DOCKER=docker"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    loop = re.search(r"for service in ([\w ]+); do", dry_run)
    assert loop is not None and loop.group(1).split() == list(SERVICES), dry_run
    assert ("docker build -f services/Dockerfile --build-arg SERVICE=$service "
            "-t registry.example/shopvision-$service:t .") in dry_run, dry_run


def protoc_command(ops: list[tuple[str, str]]) -> list[str]:
    runs = [args for op, args in ops if op == "RUN" and "grpc_tools.protoc" in args]
    assert len(runs) == 1
    step = next(part for part in runs[0].split("&&") if "grpc_tools.protoc" in part)
    return shlex.split(step)


@pytest.mark.parametrize("service", SERVICES)
def test_stub_generation_matches_make_protos(service: str, tmp_path: Path) -> None:
    """Run the Dockerfile's protoc step here; its output must equal gen/ from `make protos`."""
    argv = protoc_command(build_ops(service))
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
    app = tmp_path / "app"
    (app / "services").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "services" / "__init__.py", app / "services")
    for package in copied_packages(image_ops(service)):
        shutil.copytree(REPO_ROOT / "services" / package, app / "services" / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO_ROOT / "gen", app / "gen", ignore=shutil.ignore_patterns("__pycache__", ".stamp"))
    env = {**os.environ, "PYTHONPATH": f"{app}:{app / 'gen'}", "PYTHONDONTWRITEBYTECODE": "1"}
    probe = (f"import services.{service}.server, services.{service}.__main__, services; "
             f"assert services.__file__.startswith({str(app)!r}), services.__file__")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    ignore = (REPO_ROOT / "services" / "Dockerfile.dockerignore").read_text().splitlines()
    assert f"!services/{service}/" in ignore and "*" in ignore
