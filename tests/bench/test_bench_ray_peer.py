"""The framework peer: Ray Serve's gRPC ingress answers our proto with the stack's recipe, and stops completely."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from bench import run as bench_run
from bench.harness.data import model_spec
from bench.peers import install
from bench.targets import RayServePeer, session_members
from tests.conftest import photo_bytes


def test_the_stamp_says_whether_the_environment_matches_its_requirements(tmp_path: Path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("ray[serve]==2.60.0\n")
    peer = install.PeerEnv("test", requirements, tmp_path / "peer")
    assert not peer.installed()  # no interpreter yet
    peer.python.parent.mkdir(parents=True)
    peer.python.touch()
    peer.stamp.write_text(requirements.read_text())
    assert peer.installed()
    requirements.write_text("ray[serve]==2.61.0\n")  # a changed pin makes it stale
    assert not peer.installed()


def test_the_pinned_requirements_match_the_main_environment():
    """Same ONNX Runtime, OpenCV, NumPy and protobuf/gRPC as requirements.txt: the comparison is like for like."""
    root = install.REPO_ROOT
    pins = lambda path: dict(line.split("==", 1) for line in path.read_text().splitlines()  # noqa: E731
                             if "==" in line and not line.startswith("#"))
    ours, peer = pins(root / "requirements.txt"), pins(install.RAY.requirements)
    for name in ("numpy", "opencv-python-headless", "onnxruntime", "grpcio", "protobuf"):
        assert peer[name] == ours[name], name
    assert peer["ray[serve]"]


def test_a_peer_that_cannot_start_is_a_result_with_its_error_text(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    def fail(self: RayServePeer, timeout_s: float = 0.0) -> RayServePeer:
        raise RuntimeError("Ray Serve peer exited with code 1; see ray-serve.log")

    monkeypatch.setattr(RayServePeer, "start", fail)
    plan = bench_run.Plan.from_args(bench_run.get_args_parser().parse_args([]))
    assert bench_run.framework_peer(plan, model_spec(), {}, tmp_path) == {
        "ray_error": "RuntimeError: Ray Serve peer exited with code 1; see ray-serve.log"}


@pytest.fixture(scope="module")
def ray_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServePeer]:
    if not install.RAY.installed():
        pytest.skip(f"the Ray Serve peer's environment is not installed ({install.RAY.venv}): run `make bench-peers` "
                    "(`make bench` installs it too)")
    log = Path(tmp_path_factory.mktemp("ray")) / "ray-serve.log"
    with RayServePeer(model_spec(), replicas=1, intra_op_threads=1, log_path=log) as peer:
        yield peer
    assert peer.process is not None
    assert session_members(peer.process.pid) == [], "Ray processes outlived the peer"
    assert not peer.temp_dir.exists()


@pytest.mark.stack
def test_the_ray_serve_peer_answers_classify_with_an_espresso(ray_peer: RayServePeer):
    with grpc.insecure_channel(ray_peer.address) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
        reply = stub.Classify(recognition_pb2.ClassifyRequest(image=photo_bytes("coffee.png"), top_k=3), timeout=60)
        assert [p.label for p in reply.predictions][:1] == ["espresso"] and len(reply.predictions) == 3
        assert reply.predictions[0].class_id == 967 and reply.predictions[0].score > 0.5
        assert (reply.image_width, reply.image_height) == (600, 400)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Classify(recognition_pb2.ClassifyRequest(image=b"not an image"), timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
