"""Re-embedding a catalog into a new model version while it serves: real Triton with two versions, real PostgreSQL.

A private stack serves a copy of ``fashion_cnn`` whose classifier gets a second version with perturbed weights
(so its embeddings differ measurably). ``python -m tools.reembed`` moves a catalog from version 1 to 2 while
searches and writes go on; no answer may mix versions, no product may be lost.
"""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psycopg
import pytest
from shopvision.v1 import recognition_pb2 as pb
from shopvision.v1 import recognition_pb2_grpc

from devstack.stack import REPO_ROOT, Ports, Stack
from tools import index_catalog
from tools.catalog import CatalogItem, read_catalog

MODEL = "fashion_cnn"
CATALOG = "reembed"
SIZE = 120


def perturbed_copy(source: Path, target: Path, relative_noise: float = 0.3, seed: int = 0) -> None:
    """The same graph with Gaussian noise on every weight tensor: a stand-in for a retrained version."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(source)
    rng = np.random.default_rng(seed)
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if values.dtype != np.float32 or values.size < 2:
            continue
        noisy = values + rng.normal(0.0, relative_noise * float(values.std()), values.shape).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(noisy, tensor.name))
    target.parent.mkdir(parents=True)
    onnx.save(model, target)


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("reembed")
    repository = root / "models"
    for name in (MODEL, f"{MODEL}_onnx", "postprocess_softmax"):
        shutil.copytree(REPO_ROOT / "model_repository" / name, repository / name)
    stack = Stack(ports=Ports.free(), log_dir=root / "logs", postgres_dir=root / "pg",
                  extra_env={"TRITON_MODEL_REPOSITORY": str(repository), "GATEWAY_DEFAULT_MODEL": MODEL,
                             "GATEWAY_SEARCH_MODEL": MODEL})
    stack.start()
    stack.repository = repository  # type: ignore[attr-defined]
    yield stack
    stack.stop()


def load_version_2(stack: Stack) -> None:
    import tritonclient.grpc as triton

    repository: Path = stack.repository  # type: ignore[attr-defined]
    perturbed_copy(repository / f"{MODEL}_onnx" / "1" / "model.onnx", repository / f"{MODEL}_onnx" / "2" / "model.onnx")
    client = triton.InferenceServerClient(stack.triton_grpc_address)
    client.load_model(f"{MODEL}_onnx")
    deadline = time.monotonic() + 60
    while not (client.is_model_ready(f"{MODEL}_onnx", "2") and client.is_model_ready(f"{MODEL}_onnx", "1")):
        assert time.monotonic() < deadline, "both versions of the classifier should be READY"
        time.sleep(0.2)
    client.close()


def embedding(stack: Stack, item: CatalogItem, version: str) -> np.ndarray:
    """The classifier's embedding of one catalog image, straight from Triton (the preprocess recipe of
    fashion_cnn is the identity on a 28x28 Fashion-MNIST image)."""
    import cv2
    import tritonclient.grpc as triton

    pixels = cv2.imdecode(np.frombuffer(item.read(), np.uint8), cv2.IMREAD_GRAYSCALE)[None, :, :, None]
    client = triton.InferenceServerClient(stack.triton_grpc_address)
    inputs = [triton.InferInput("image", list(pixels.shape), "UINT8")]
    inputs[0].set_data_from_numpy(pixels)
    vector = client.infer(f"{MODEL}_onnx", inputs, model_version=version,
                          outputs=[triton.InferRequestedOutput("embedding")]).as_numpy("embedding")[0]
    client.close()
    return vector / np.linalg.norm(vector)


@pytest.mark.slow  # a catalog re-embedded under load by a second model version (~25 s)
def test_reembed_moves_the_catalog_under_load_without_mixing_versions(two_versions: Stack, tmp_path: Path) -> None:
    stack = two_versions
    catalog = read_catalog(f"fashion-mnist:train:{SIZE}")
    late = read_catalog("fashion-mnist:test:10")
    args = index_catalog.get_args_parser().parse_args(
        [f"fashion-mnist:train:{SIZE}", "--gateway", stack.gateway_address, "--state", str(tmp_path / "state.jsonl"),
         "--catalog", CATALOG, "--model", MODEL, "--no-progress"])
    assert index_catalog.main(args) == 0
    load_version_2(stack)
    # The two versions really differ: a search mixing them could not score a product against itself as 1.0.
    cross = [float(embedding(stack, item, "1") @ embedding(stack, item, "2")) for item in catalog[:5]]
    assert max(cross) < 0.99, cross

    stub = recognition_pb2_grpc.ProductRecognitionStub(grpc.insecure_channel(stack.gateway_address))
    before = stub.SearchSimilar(pb.SearchSimilarRequest(image=catalog[0].read(), k=1, catalog=CATALOG), timeout=30)
    assert before.model_version == "1" and before.matches[0].score > 0.995  # still the serving version

    problems: list[str] = []
    versions_seen: set[str] = set()
    stop = threading.Event()

    async def searchers() -> None:
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            client = recognition_pb2_grpc.ProductRecognitionStub(channel)

            async def loop(offset: int) -> None:
                i = offset
                while not stop.is_set():
                    item = catalog[i % len(catalog)]
                    i += 3
                    reply = await client.SearchSimilar(pb.SearchSimilarRequest(image=item.read(), k=3,
                                                                               catalog=CATALOG), timeout=30)
                    versions_seen.add(reply.model_version)
                    top = reply.matches[0] if reply.matches else None
                    if top is None or top.product_id != item.product_id or top.score < 0.995:
                        problems.append(f"{item.product_id} v{reply.model_version}: "
                                        f"{[(m.product_id, round(m.score, 4)) for m in reply.matches]}")

            async def writer() -> None:  # products that arrive during the re-embedding
                for item in late:
                    await client.IndexProduct(pb.IndexProductRequest(
                        product_id=item.product_id, image=item.read(), catalog=CATALOG, category=item.category),
                        timeout=30)
                    await asyncio.sleep(0.2)

            await asyncio.gather(loop(0), loop(1), loop(2), writer())

    thread = threading.Thread(target=lambda: asyncio.run(searchers()))
    thread.start()
    try:
        time.sleep(1.0)
        result = subprocess.run(
            [sys.executable, "-m", "tools.reembed", "--catalog", CATALOG, "--database-url", stack.postgres_url,
             "--triton", stack.triton_grpc_address, "--preprocess", stack.preprocess_address, "--grace", "2",
             "--no-progress"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "now serves fashion_cnn version 2" in result.stderr, result.stderr[-2000:]
    assert problems == [], problems[:5]
    assert "2" in versions_seen

    status = {c.name: c for c in stub.ListCatalogs(pb.ListCatalogsRequest(), timeout=10).catalogs}[CATALOG]
    assert (status.model_version, status.reembed_version, status.product_count) == ("2", "", SIZE + len(late))
    listed = stub.ListProducts(pb.ListProductsRequest(catalog=CATALOG, page_size=1000), timeout=10).products
    assert len(listed) == SIZE + len(late) and {p.model_version for p in listed} == {"2"}
    for item in (catalog[7], late[-1]):
        top = stub.SearchSimilar(pb.SearchSimilarRequest(image=item.read(), k=1, catalog=CATALOG), timeout=30)
        assert top.model_version == "2" and top.matches[0].product_id == item.product_id
        assert top.matches[0].score > 0.995
    with psycopg.connect(stack.postgres_url) as conn:
        counts = dict(conn.execute("SELECT model_version, count(*) FROM embeddings GROUP BY 1").fetchall())
    assert counts == {"2": SIZE + len(late)}  # the old vectors are gone after the grace period

    # Running it again is a no-op: the catalog already serves the newest version.
    again = subprocess.run(
        [sys.executable, "-m", "tools.reembed", "--catalog", CATALOG, "--database-url", stack.postgres_url,
         "--triton", stack.triton_grpc_address, "--preprocess", stack.preprocess_address, "--no-progress"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr[-2000:]
