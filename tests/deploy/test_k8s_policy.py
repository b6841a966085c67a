"""Policy checks on the rendered manifests: what every container must have, and that the manifests
agree with the code (ports, environment variables, probes, Triton flags, the model repository)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import text_format
from k8s_manifests import (
    COMBINATIONS,
    FEATURES,
    NAMESPACE,
    OVERLAYS,
    REPO_ROOT,
    Obj,
    all_containers,
    combination_id,
    config_map_by_prefix,
    container,
    container_env,
    cpu_cores,
    env_names_read,
    find,
    known_env,
    labels_match,
    named_port,
    of_kind,
    pod_labels,
    render,
    workloads,
)
from tritonclient.grpc import model_config_pb2

from services.common.grpc_server import LIVENESS_SERVICE
from services.gateway.config import GatewayConfig
from services.preprocess.config import PreprocessConfig
from services.triton.config import TritonConfig
from services.triton.launcher import command

MODEL_REPOSITORY = REPO_ROOT / "model_repository"
GPU_CONFIGS = REPO_ROOT / "deploy" / "k8s" / "overlays" / "gpu" / "model-configs"
CONFIGS: dict[str, type[GatewayConfig] | type[PreprocessConfig]] = {
    "gateway": GatewayConfig, "preprocess": PreprocessConfig}
# Flags the container adds to the launcher's: per overlay. --backend-directory is the launcher's own
# (the wheel has no ONNX Runtime backend; the NGC image has its native one in the default place).
EXTRA_TRITON_FLAGS = {"cpu": set(), "gpu": {"--model-config-name"}}
LAUNCHER_ONLY_FLAGS = {"--backend-directory"}
DRAIN_MARGIN_S = 5
# Not GATEWAY_* but read by the gateway's database driver (libpq): the password of the in-cluster database.
LIBPQ_ENV = {"gateway": {"PGPASSWORD"}, "preprocess": set()}


def full(overlay: str) -> list[Obj]:
    return render(overlay, (*FEATURES, "postgres"))


def deployments() -> list[tuple[str, Obj]]:
    """Every workload (Deployments and the database's StatefulSet) of both overlays."""
    return [(f"{overlay}/{d['metadata']['name']}", d) for overlay in OVERLAYS for d in workloads(full(overlay))]


@pytest.mark.parametrize("label,deployment", deployments(), ids=[label for label, _ in deployments()])
def test_every_container_is_locked_down_and_sized(label: str, deployment: Obj) -> None:
    pod = deployment["spec"]["template"]["spec"]
    assert pod.get("automountServiceAccountToken") is False, label
    assert pod.get("serviceAccountName") == deployment["metadata"]["name"], label
    pod_security = pod.get("securityContext", {})
    assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", label
    for c, init in all_containers(deployment):
        where = f"{label}/{c['name']}"
        security = {**pod_security, **c.get("securityContext", {})}
        assert security.get("runAsNonRoot") is True, where
        assert security.get("runAsUser", 0) != 0, f"{where} runs as root"
        assert security.get("readOnlyRootFilesystem") is True, where
        assert security.get("allowPrivilegeEscalation") is False, where
        assert security.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not security.get("capabilities", {}).get("add"), where
        assert not security.get("privileged"), where
        resources = c.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert resource in resources.get(kind, {}), f"{where} has no {kind}.{resource}"
        assert cpu_cores(resources["requests"]["cpu"]) <= cpu_cores(resources["limits"]["cpu"]), where
        image = c["image"]
        assert re.search(r"(:[\w][\w.-]{0,127}|@sha256:[0-9a-f]{64})$", image.rsplit("/", 1)[-1]), \
            f"{where}: image {image} is pinned by neither tag nor digest"
        assert not image.endswith(":latest"), f"{where}: image {image} uses latest"
        if not init:
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in c, f"{where} has no {probe}"
        # Writable paths are volumes (the root filesystem is read-only): the pod's or a StatefulSet's claims.
        volumes = {v["name"] for v in pod.get("volumes", [])} | {
            claim["metadata"]["name"] for claim in deployment["spec"].get("volumeClaimTemplates", [])}
        assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes, where


@pytest.mark.parametrize("database", ["postgres", "external-postgres"])
@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", ["gateway", "preprocess"])
def test_service_environment_matches_config(overlay: str, service: str, database: str) -> None:
    """Every variable config.py reads is set in the Deployment, every one set is read, and it parses."""
    objects = render(overlay, (*FEATURES, database))
    c = container(find(objects, "Deployment", service))
    env = container_env(objects, c)
    prefix = f"{service.upper()}_"
    read = env_names_read(REPO_ROOT / "services" / service / "config.py", prefix)
    assert read, "no env_* calls found in config.py: the parser of this test is out of date"
    own = {name for name in env if name.startswith(prefix)}
    assert own == read, f"missing: {sorted(read - own)}, unused: {sorted(own - read)}"
    assert set(env) - own <= LIBPQ_ENV[service], f"read by nobody: {sorted(set(env) - own - LIBPQ_ENV[service])}"
    CONFIGS[service].from_env(known_env(env))


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", ["gateway", "preprocess"])
def test_ports_probes_and_drain_match_the_server(overlay: str, service: str) -> None:
    objects = full(overlay)
    deployment = find(objects, "Deployment", service)
    c = container(deployment)
    config = CONFIGS[service].from_env(known_env(container_env(objects, c)))
    defaults = CONFIGS[service].from_env({})
    host, _, port = config.address.rpartition(":")
    assert host == "0.0.0.0", "in a pod the server must listen on all interfaces"
    assert int(port) == named_port(c, "grpc") == int(defaults.address.rpartition(":")[2])
    assert config.metrics_port == named_port(c, "metrics") == defaults.metrics_port
    service_obj = find(objects, "Service", service)
    ports = {p["name"]: p for p in service_obj["spec"]["ports"]}
    assert ports["grpc"]["port"] == int(port) and ports["grpc"]["targetPort"] == "grpc"
    assert ports["metrics"]["port"] == config.metrics_port and ports["metrics"]["targetPort"] == "metrics"
    # Readiness follows the server's overall health (""), liveness the entry that stays SERVING.
    assert c["readinessProbe"]["grpc"] == {"port": int(port)}
    for probe in ("livenessProbe", "startupProbe"):
        assert c[probe]["grpc"] == {"port": int(port), "service": LIVENESS_SERVICE}, probe
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= float(pre_stop[1]) + config.grace_s + DRAIN_MARGIN_S


UPSTREAM_TARGET = re.compile(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)")


def test_gateway_balances_over_every_preprocess_and_triton_pod() -> None:
    """The upstream addresses are dns:/// targets of headless Services: the name resolves to every ready pod and
    the gateway's round_robin channel spreads its calls over them (a virtual IP would tie it to one pod)."""
    for overlay in OVERLAYS:
        objects = full(overlay)
        gateway = container(find(objects, "Deployment", "gateway"))
        config = GatewayConfig.from_env(known_env(container_env(objects, gateway)))
        triton_args = container(find(objects, "Deployment", "triton"))["args"]
        for address, target in ((config.preprocess_address, "preprocess"), (config.triton_address, "triton")):
            match = UPSTREAM_TARGET.fullmatch(address)
            assert match, f"{address} is not a dns:/// target of a Service's cluster name"
            name, namespace, port = match.groups()
            assert (name, namespace) == (target, NAMESPACE), address
            service = find(objects, "Service", target)
            assert service["spec"].get("clusterIP") == "None", f"Service {target} is not headless"
            assert not service["spec"].get("publishNotReadyAddresses"), "only ready pods may be in the DNS answer"
            ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
            assert ports["grpc"] == int(port)
            # DNS answers pod addresses: the client dials the container port itself, no Service port mapping.
            assert named_port(container(find(objects, "Deployment", target)), "grpc") == int(port)
            assert labels_match(service["spec"]["selector"], pod_labels(find(objects, "Deployment", target)))
        assert f"--grpc-port={config.triton_address.rpartition(':')[2]}" in triton_args
        assert config.default_model in {a.split("=", 1)[1] for a in triton_args if a.startswith("--load-model=")}


def test_preprocess_workers_fit_the_cpu_limit() -> None:
    for overlay in OVERLAYS:
        objects = full(overlay)
        c = container(find(objects, "Deployment", "preprocess"))
        workers = PreprocessConfig.from_env(known_env(container_env(objects, c))).workers
        assert workers <= cpu_cores(c["resources"]["limits"]["cpu"]) + 0.01


def triton_flags(args: list[str]) -> dict[str, list[str]]:
    flags: dict[str, list[str]] = {}
    for arg in args:
        flag, sep, value = arg.partition("=")
        assert sep, f"Triton arg {arg!r} is not --flag=value"
        flags.setdefault(flag, []).append(value)
    return flags


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_args_are_the_launchers_flags(overlay: str) -> None:
    objects = full(overlay)
    c = container(find(objects, "Deployment", "triton"))
    assert c["command"] == ["tritonserver"]
    assert c["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3", "keep the NGC release = the wheel's Triton 2.51"
    flags = triton_flags(c["args"])
    config = TritonConfig.from_env({
        "TRITON_MODEL_REPOSITORY": flags["--model-repository"][0],
        "TRITON_BACKEND_DIRECTORY": "/opt/tritonserver/backends",
        "TRITON_HOST": flags["--http-address"][0],
        "TRITON_HTTP_PORT": flags["--http-port"][0],
        "TRITON_GRPC_PORT": flags["--grpc-port"][0],
        "TRITON_METRICS_PORT": flags["--metrics-port"][0],
        "TRITON_LOG_VERBOSE": flags["--log-verbose"][0],
        "TRITON_EXIT_TIMEOUT_SECONDS": flags["--exit-timeout-secs"][0],
        "TRITON_LOAD_MODELS": ",".join(flags["--load-model"]),
    })
    launcher = [a for a in command(config)[1:] if a.partition("=")[0] not in LAUNCHER_ONLY_FLAGS]
    assert set(launcher) <= set(c["args"]), f"missing: {sorted(set(launcher) - set(c['args']))}"
    extra = {a.partition("=")[0] for a in set(c["args"]) - set(launcher)}
    assert extra == EXTRA_TRITON_FLAGS[overlay]
    assert config.host == "0.0.0.0"
    defaults = TritonConfig.from_env({})
    for name, port in (("http", config.http_port), ("grpc", config.grpc_port), ("metrics", config.metrics_port)):
        assert named_port(c, name) == port
    assert (config.http_port, config.grpc_port, config.metrics_port) == (
        defaults.http_port, defaults.grpc_port, defaults.metrics_port)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert str(config.model_repository) in mounts and mounts[str(config.model_repository)].get("readOnly")
    init = container(find(objects, "Deployment", "triton"), "fetch-models", init=True)
    assert container_env(objects, init)["MODEL_DIR"] == str(config.model_repository)
    # The Python backend needs a real /dev/shm.
    volumes = {v["name"]: v for v in find(objects, "Deployment", "triton")["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    grace = find(objects, "Deployment", "triton")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= config.exit_timeout_s + float(c["lifecycle"]["preStop"]["exec"]["command"][1]) + DRAIN_MARGIN_S
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        assert c[probe]["httpGet"] == {"path": path, "port": "http"}, probe


def model_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def public_closure() -> set[str]:
    """Public models of model_repository/ plus every model their ensembles call."""
    configs = {p.parent.name: model_config(p) for p in MODEL_REPOSITORY.glob("*/config.pbtxt")}
    wanted = [name for name, c in configs.items() if c.parameters["shopvision.public"].string_value == "true"]
    assert wanted, "model_repository/ has no public model"
    closure: set[str] = set()
    while wanted:
        name = wanted.pop()
        if name in closure:
            continue
        assert name in configs, f"an ensemble calls {name}, which model_repository/ does not have"
        closure.add(name)
        wanted += [step.model_name for step in configs[name].ensemble_scheduling.step]
    return closure


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_loads_exactly_the_public_models_and_their_steps(overlay: str) -> None:
    args = container(find(full(overlay), "Deployment", "triton"))["args"]
    loaded = set(triton_flags(args)["--load-model"])
    expected = public_closure()
    assert loaded == expected, (f"deploy/k8s/base/triton.yaml: add --load-model for {sorted(expected - loaded)}, "
                                f"remove {sorted(loaded - expected)}")


def test_gpu_overlay_runs_the_classifier_on_the_gpu_with_tensorrt() -> None:
    objects = full("gpu")
    triton = find(objects, "Deployment", "triton")
    pod = triton["spec"]["template"]["spec"]
    c = container(triton)
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    name = triton_flags(c["args"])["--model-config-name"][0]
    init = container(triton, "fetch-models", init=True)
    init_env = container_env(objects, init)
    assert init_env["MODEL_CONFIG_NAME"] == name
    mounted = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    configs = config_map_by_prefix(objects, "triton-model-configs")
    assert volumes[mounted[init_env["MODEL_CONFIGS_DIR"]]]["configMap"]["name"] == configs["metadata"]["name"]
    files = sorted(GPU_CONFIGS.glob("*.pbtxt"))
    assert files and set(configs["data"]) == {f.name for f in files}
    triton_mounts = [m["mountPath"] for m in c["volumeMounts"]]
    for file in files:
        assert configs["data"][file.name] == file.read_text()
        gpu = model_config(file)
        base = model_config(MODEL_REPOSITORY / file.stem / "config.pbtxt")
        assert gpu.name == file.stem
        assert all(g.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU for g in gpu.instance_group)
        assert sum(g.count for g in gpu.instance_group) > sum(g.count for g in base.instance_group)
        accelerators = gpu.optimization.execution_accelerators.gpu_execution_accelerator
        assert [a.name for a in accelerators] == ["tensorrt"]
        cache = accelerators[0].parameters.get("trt_engine_cache_path")
        assert cache is None or any(cache == m or cache.startswith(m + "/") for m in triton_mounts), cache
        # The tensors, batching and versions are the repository's: only the hardware differs.
        for config in (gpu, base):
            config.ClearField("instance_group")
            config.ClearField("optimization")
            config.ClearField("parameters")
        assert gpu == base, f"{file} drifted from model_repository/{file.stem}/config.pbtxt"


def test_cpu_overlay_uses_the_repository_configs_as_they_are() -> None:
    objects = full("cpu")
    triton = find(objects, "Deployment", "triton")
    assert "--model-config-name" not in triton_flags(container(triton)["args"])
    assert "MODEL_CONFIG_NAME" not in container_env(objects, container(triton, "fetch-models", init=True))
    assert not config_map_by_prefix(objects, "triton-model-configs").get("data")
    assert "nvidia.com/gpu" not in container(triton)["resources"]["limits"]


@pytest.mark.parametrize("combination", COMBINATIONS, ids=combination_id)
def test_selectors_and_autoscaler_targets_exist(combination: tuple) -> None:
    objects = render(*combination)
    deployments = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment")}
    pods = {d["metadata"]["name"]: d for d in workloads(objects)}
    for service in of_kind(objects, "Service"):
        targets = [d for d in pods.values() if labels_match(service["spec"]["selector"], pod_labels(d))]
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {len(targets)} workloads"
        for port in service["spec"]["ports"]:
            named_port(container(targets[0]), port["targetPort"])
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        selected = [d for d in deployments.values() if labels_match(pdb["spec"]["selector"]["matchLabels"],
                                                                    pod_labels(d))]
        assert len(selected) == 1, pdb["metadata"]["name"]
    autoscaled = set()
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
        assert target["name"] in deployments, f"HPA {hpa['metadata']['name']} targets a missing Deployment"
        # The autoscaler owns the replica count: `make deploy` must not reset it.
        assert "replicas" not in deployments[target["name"]]["spec"]
        assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        metrics = hpa["spec"]["metrics"]
        assert {"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": 70}}} in metrics
        autoscaled.add(target["name"])
    assert autoscaled == {"gateway", "preprocess"}
    # Labels the NetworkPolicies and the ServiceMonitor select on.
    for workload in pods.values():
        assert pod_labels(workload)["app.kubernetes.io/part-of"] == "shopvision"


def ingress_allowed(policies: list[Obj], destination: Obj, port: str, source_labels: dict[str, str],
                    source_namespace: dict[str, str]) -> bool:
    """NetworkPolicy semantics (podSelector/namespaceSelector peers, named ports) for one connection
    from a pod with ``source_labels`` in a namespace labelled ``source_namespace`` to ``destination``."""
    same_namespace = source_namespace.get("kubernetes.io/metadata.name") == NAMESPACE
    selecting = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and labels_match(p["spec"]["podSelector"].get("matchLabels", {}), pod_labels(destination))]
    if not selecting:
        return True
    number = named_port(container(destination), port)
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") in (port, number) for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                pods = peer.get("podSelector")
                namespaces = peer.get("namespaceSelector")
                pod_ok = pods is None or labels_match(pods.get("matchLabels", {}), source_labels)
                if namespaces is None:
                    namespace_ok = same_namespace
                else:
                    namespace_ok = labels_match(namespaces.get("matchLabels", {}), source_namespace)
                if pod_ok and namespace_ok:
                    return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_only_the_documented_paths(overlay: str) -> None:
    objects = full(overlay)
    policies = of_kind(objects, "NetworkPolicy")
    pods = {name: find(objects, "Deployment", name) for name in ("gateway", "preprocess", "triton")}
    pods["postgres"] = find(objects, "StatefulSet", "postgres")
    inside = {"kubernetes.io/metadata.name": NAMESPACE}
    outside: tuple[dict[str, str], dict[str, str]] = ({}, {"kubernetes.io/metadata.name": "default"})
    prometheus = ({"app.kubernetes.io/name": "prometheus"}, {"kubernetes.io/metadata.name": "monitoring"})

    def allowed(source: tuple[dict, dict], target: str, port: str) -> bool:
        return ingress_allowed(policies, pods[target], port, *source)

    # Clients anywhere reach the gateway's API, and nothing else.
    assert allowed(outside, "gateway", "grpc")
    for target, port in (("preprocess", "grpc"), ("triton", "grpc"), ("triton", "http"), ("gateway", "metrics"),
                         ("postgres", "postgres")):
        assert not allowed(outside, target, port), (target, port)
    # Inside the namespace only the gateway calls preprocess and Triton.
    gateway = (pod_labels(pods["gateway"]), inside)
    assert allowed(gateway, "preprocess", "grpc") and allowed(gateway, "triton", "grpc")
    for source, target in (("preprocess", "triton"), ("triton", "preprocess")):
        assert not allowed((pod_labels(pods[source]), inside), target, "grpc"), (source, target)
    # The catalog database: the gateway logs in, nobody else (not even Prometheus: it has no metrics port).
    assert named_port(container(pods["postgres"]), "postgres") == 5432
    assert allowed(gateway, "postgres", "postgres")
    for source in ("preprocess", "triton"):
        assert not allowed((pod_labels(pods[source]), inside), "postgres", "postgres"), source
    assert not allowed(prometheus, "postgres", "postgres")
    assert not allowed(({"app.kubernetes.io/name": "gateway"}, {"kubernetes.io/metadata.name": "default"}),
                       "postgres", "postgres"), "a pod labelled gateway in another namespace"
    assert not allowed(gateway, "triton", "http"), "Triton's HTTP API (model control) stays closed"
    # Prometheus scrapes every metrics port, and only those.
    for target in ("gateway", "preprocess", "triton"):
        assert allowed(prometheus, target, "metrics"), target
    assert not allowed(prometheus, "preprocess", "grpc")
    # Without the component, nothing is restricted (so the evaluator above can say no only because of it).
    assert ingress_allowed([], pods["triton"], "http", *outside)
