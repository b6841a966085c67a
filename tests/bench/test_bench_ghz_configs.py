"""The ghz configs in bench/ghz/ are valid against the proto: the call exists, the data parses, the image decodes."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from shopvision.v1 import recognition_pb2

from bench.loadgen import parse_go_duration, payloads_from_ghz_config
from devstack.stack import REPO_ROOT, Stack

CONFIG_DIR = REPO_ROOT / "bench" / "ghz"
CONFIGS = sorted(CONFIG_DIR.glob("*.json"))
# The keys ghz reads from a JSON config (runner.Config's json tags); anything else is a typo ghz ignores.
GHZ_KEYS = {
    "proto", "protoset", "call", "cacert", "cert", "key", "skipTLS", "skipFirst", "cname", "authority", "insecure",
    "total", "async", "concurrency", "concurrency-schedule", "concurrency-start", "concurrency-end",
    "concurrency-step", "concurrency-step-duration", "concurrency-max-duration", "connections", "rps", "duration",
    "duration-stop", "max-duration", "timeout", "data", "data-file", "binary-file", "metadata", "metadata-file",
    "stream-interval", "output", "format", "connect-timeout", "keepalive", "cpus", "import-paths", "name", "tags",
    "reflect-metadata", "debug", "host", "enable-compression", "load-schedule", "load-start", "load-end",
    "load-step", "load-step-duration", "load-max-duration",
}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def compiled_services(config: dict, tmp_path: Path) -> dict[str, descriptor_pb2.ServiceDescriptorProto]:
    """Compile the config's proto with protoc (as ghz parses it) and index its services by full name."""
    import grpc_tools
    from grpc_tools import protoc

    out = tmp_path / "descriptor.pb"
    includes = [f"-I{REPO_ROOT / p}" for p in config.get("import-paths", [])]
    includes.append(f"-I{Path(grpc_tools.__file__).parent / '_proto'}")
    proto = REPO_ROOT / config["proto"]
    assert proto.exists(), f"{config['proto']} does not exist"
    code = protoc.main(["protoc", *includes, f"--descriptor_set_out={out}", "--include_imports", str(proto)])
    assert code == 0, f"protoc could not compile {config['proto']} with import paths {config.get('import-paths')}"
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return {f"{f.package}.{s.name}": s for f in files for s in f.service}


def test_configs_cover_both_load_shapes_and_both_ways_to_find_the_proto():
    configs = [load(p) for p in CONFIGS]
    assert any("rps" in c for c in configs) and any("rps" not in c for c in configs)
    assert any("proto" in c for c in configs) and any("proto" not in c and "protoset" not in c for c in configs)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_valid_against_the_proto(path: Path, tmp_path: Path):
    config = load(path)
    unknown = set(config) - GHZ_KEYS
    assert not unknown, f"keys ghz does not know: {sorted(unknown)}"
    assert config["insecure"] is True
    assert config["host"].startswith("127.0.0.1:")
    for key in ("duration", "max-duration", "timeout"):
        if key in config:
            assert parse_go_duration(config[key]) > 0
    if "rps" not in config:
        assert config["total"] >= config["concurrency"], "ghz refuses a total below the concurrency"

    service_name, _, method_name = config["call"].rpartition(".")
    if "proto" in config:
        services = compiled_services(config, tmp_path)
        assert service_name in services, f"{service_name} is not in {config['proto']}"
        methods = {m.name: m for m in services[service_name].method}
        assert method_name in methods
        assert methods[method_name].input_type == ".shopvision.v1.ClassifyRequest"
    else:
        method = descriptor_pool.Default().FindMethodByName(config["call"])
        assert method.input_type.full_name == "shopvision.v1.ClassifyRequest"

    payloads = payloads_from_ghz_config(config, REPO_ROOT)  # JSON data is parsed strictly (unknown fields fail)
    assert payloads
    for payload in payloads:
        request = recognition_pb2.ClassifyRequest.FromString(payload)
        assert request.SerializeToString() == payload, "the data holds fields ClassifyRequest does not have"
        image = cv2.imdecode(np.frombuffer(request.image, dtype=np.uint8), cv2.IMREAD_COLOR)
        assert image is not None, "the request's image does not decode"
        assert min(image.shape[:2]) >= 224 and image.shape[2] == 3


def test_json_and_binary_data_send_the_same_request():
    by_kind = {}
    for path in CONFIGS:
        config = load(path)
        kind = "binary" if "binary-file" in config else "json"
        by_kind.setdefault(kind, payloads_from_ghz_config(config, REPO_ROOT)[0])
    assert set(by_kind) == {"binary", "json"}
    assert recognition_pb2.ClassifyRequest.FromString(by_kind["binary"]) == \
        recognition_pb2.ClassifyRequest.FromString(by_kind["json"])


@pytest.mark.stack
def test_reflection_configs_find_the_call_through_server_reflection(stack: Stack):
    calls = {load(p)["call"] for p in CONFIGS if "proto" not in load(p)}
    with grpc.insecure_channel(stack.gateway_address) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        for call in calls:
            service_name, _, method_name = call.rpartition(".")
            method = pool.FindServiceByName(service_name).methods_by_name[method_name]
            assert method.input_type.full_name == "shopvision.v1.ClassifyRequest"
