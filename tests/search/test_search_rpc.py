"""The shared catalog end to end: a real Fashion-MNIST catalog indexed through a running gateway into PostgreSQL.

One private gateway on the session stack's Triton, preprocess and PostgreSQL is filled by
``python -m tools.index_catalog`` (catalog ``rpc``, on the ImageNet model: the fine-tuned one has its own
module) and shared by the tests of this module. A second gateway process answers the cross-replica tests.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator

import grpc
import pytest
from shopvision.v1 import recognition_pb2 as pb
from shopvision.v1 import recognition_pb2_grpc

from devstack.stack import Stack
from tests.conftest import photo_bytes
from tests.metrics_util import scrape, value
from tests.search.gateways import CATALOG_SIZE, PrivateGateway
from tools import index_catalog
from tools.catalog import CatalogItem

CATALOG = "rpc"
MODEL = "efficientnet_lite0_imagenet"
# Precision@10 "same category" of the ImageNet EfficientNet-Lite0 embedding on this 200-product catalog
# (20 per class) measured 0.634 with exact search; the floor fails if search stopped ranking by looks.
PRECISION_FLOOR = 0.55


@pytest.fixture(scope="module")
def search_gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateGateway]:
    root = tmp_path_factory.mktemp("search-rpc")
    gateway = PrivateGateway.on(stack, root).start()
    args = index_catalog.get_args_parser().parse_args(
        [f"fashion-mnist:train:{CATALOG_SIZE}", "--gateway", gateway.address, "--state", str(root / "state.jsonl"),
         "--catalog", CATALOG, "--model", MODEL, "--no-progress"])
    assert index_catalog.main(args) == 0
    yield gateway
    gateway.stack.stop()


@pytest.fixture(scope="module")
def other_gateway(stack: Stack, search_gateway: PrivateGateway,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateGateway]:
    """A second replica: a separate gateway process on the same database."""
    gateway = PrivateGateway.on(stack, tmp_path_factory.mktemp("search-rpc-b")).start()
    yield gateway
    gateway.stack.stop()


def stub_for(address: str) -> recognition_pb2_grpc.ProductRecognitionStub:
    return recognition_pb2_grpc.ProductRecognitionStub(grpc.insecure_channel(address))


@pytest.fixture(scope="module")
def search_stub(search_gateway: PrivateGateway) -> recognition_pb2_grpc.ProductRecognitionStub:
    return stub_for(search_gateway.address)


@pytest.fixture(scope="module")
def other_stub(other_gateway: PrivateGateway) -> recognition_pb2_grpc.ProductRecognitionStub:
    return stub_for(other_gateway.address)


def search(stub, image: bytes, k: int = 0, category: str = "", filter: str = "",  # type: ignore[no-untyped-def]
           catalog: str = CATALOG) -> list[pb.Match]:
    reply = stub.SearchSimilar(pb.SearchSimilarRequest(image=image, k=k, category=category, filter=filter,
                                                       catalog=catalog), timeout=30)
    return list(reply.matches)


def rpc_error(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def test_catalog_was_indexed_and_resume_skips_it(search_gateway: PrivateGateway, search_stub) -> None:  # type: ignore[no-untyped-def]
    state = search_gateway.root / "state.jsonl"
    assert len(state.read_text().splitlines()) == CATALOG_SIZE
    args = index_catalog.get_args_parser().parse_args(
        [f"fashion-mnist:train:{CATALOG_SIZE}", "--gateway", search_gateway.address, "--state", str(state),
         "--catalog", CATALOG, "--no-progress"])
    assert index_catalog.main(args) == 0  # everything already done: nothing is sent again
    assert len(state.read_text().splitlines()) == CATALOG_SIZE
    catalogs = {c.name: c for c in search_stub.ListCatalogs(pb.ListCatalogsRequest(), timeout=10).catalogs}
    assert catalogs[CATALOG].model == MODEL and catalogs[CATALOG].model_version == "1"
    assert catalogs[CATALOG].product_count == CATALOG_SIZE


def test_precision_at_10_same_category(search_stub, fashion_queries: list[CatalogItem]) -> None:  # type: ignore[no-untyped-def]
    same = total = 0
    for query in fashion_queries:
        matches = search(search_stub, query.read())
        assert len(matches) == 10  # k = 0 means 10
        assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)
        same += sum(m.label == query.category for m in matches)
        total += len(matches)
    precision = same / total
    print(f"precision@10 over {len(fashion_queries)} queries, catalog {CATALOG_SIZE}: {precision:.3f}")
    assert precision >= PRECISION_FLOOR, precision


def test_a_catalog_photo_finds_itself_with_its_metadata_and_attributes(  # type: ignore[no-untyped-def]
        search_stub, fashion_catalog: list[CatalogItem]) -> None:
    item = fashion_catalog[37]
    reply = search_stub.SearchSimilar(pb.SearchSimilarRequest(image=item.read(), k=3, catalog=CATALOG), timeout=30)
    assert (reply.catalog, reply.model, reply.model_version) == (CATALOG, MODEL, "1")
    top = reply.matches[0]
    assert top.product_id == item.product_id
    assert top.score == pytest.approx(1.0, abs=5e-3)
    assert top.label == item.category
    assert dict(top.metadata) == {"category": item.category, "source": "fashion-mnist"}
    assert [(a.key, a.value) for a in top.attributes] == list(item.attributes)


def test_category_and_attribute_filters_return_k_matches(search_stub, fashion_catalog: list[CatalogItem]) -> None:  # type: ignore[no-untyped-def]
    bag = next(item for item in fashion_catalog if item.category == "Bag")
    matches = search(search_stub, bag.read(), k=15, category="Trouser")
    assert len(matches) == 15 and {m.label for m in matches} == {"Trouser"}
    assert search(search_stub, bag.read(), category="No such category") == []
    # Attribute filters (AND of ORs), with the category: every match passes and k of them come back when k exist.
    wanted = {i.product_id for i in fashion_catalog if i.category == "Trouser" and dict(i.attributes)["tone"] in
              ("dark", "light")}
    assert len(wanted) >= 5
    matches = search(search_stub, bag.read(), k=5, category="Trouser", filter="(tone = dark OR tone = light)")
    assert len(matches) == 5 and {m.product_id for m in matches} <= wanted
    matches = search(search_stub, bag.read(), k=len(wanted) + 5, category="Trouser",
                     filter="tone = dark OR tone = light")
    assert {m.product_id for m in matches} == wanted  # all of them, none more
    assert search(search_stub, bag.read(), filter="tone = dark AND tone = light") == []


def test_bad_requests_get_their_status_and_say_what_was_wrong(search_stub) -> None:  # type: ignore[no-untyped-def]
    coffee = photo_bytes("coffee.png")
    invalid = [
        (lambda: search(search_stub, b""), "empty"),
        (lambda: search(search_stub, b"not an image"), "not"),
        (lambda: search(search_stub, coffee, k=1000), "k=1000"),
        (lambda: search(search_stub, coffee, filter="(color = red"), "character"),
        (lambda: search(search_stub, coffee, filter="color red"), "character 6"),
        (lambda: search(search_stub, coffee, catalog="bad name!"), "not a valid name"),
        (lambda: search_stub.IndexProduct(pb.IndexProductRequest(product_id="", image=coffee, catalog=CATALOG),
                                          timeout=10), "product_id"),
        (lambda: search_stub.IndexProduct(pb.IndexProductRequest(
            product_id="many", image=coffee, catalog=CATALOG,
            attributes=[pb.Attribute(key=f"k{i}", value="v") for i in range(65)]), timeout=10), "64"),
        (lambda: search_stub.IndexProduct(pb.IndexProductRequest(
            product_id="long", image=coffee, catalog=CATALOG, attributes=[pb.Attribute(key="k", value="v" * 129)]),
            timeout=10), "128"),
        (lambda: search_stub.IndexProduct(pb.IndexProductRequest(product_id="x", image=coffee, catalog=CATALOG,
                                                                 model="fashion_cnn"), timeout=10), MODEL),
        (lambda: search_stub.IndexProductBatch(pb.IndexProductBatchRequest(requests=[
            pb.IndexProductRequest(product_id="twice", image=coffee, catalog=CATALOG),
            pb.IndexProductRequest(product_id="twice", image=coffee, catalog=CATALOG)]), timeout=10), "twice"),
        (lambda: search_stub.ListProducts(pb.ListProductsRequest(catalog=CATALOG, page_token="garbage!"),
                                          timeout=10), "page_token"),
        (lambda: search_stub.DeleteProduct(pb.DeleteProductRequest(product_id="", catalog=CATALOG),
                                           timeout=10), "product_id"),
        (lambda: search_stub.CreateCatalog(pb.CreateCatalogRequest(name="new-one", model="no_such_model"),
                                           timeout=10), "no_such_model"),
    ]
    for call, says in invalid:
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert says in error.details(), error.details()
    for call in (lambda: search(search_stub, coffee, catalog="never-created"),
                 lambda: search_stub.GetProduct(pb.GetProductRequest(catalog=CATALOG, product_id="nope"), timeout=10),
                 lambda: search_stub.ListProducts(pb.ListProductsRequest(catalog="never-created"), timeout=10)):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    error = rpc_error(lambda: search_stub.CreateCatalog(pb.CreateCatalogRequest(name=CATALOG), timeout=10))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS and MODEL in error.details()
    # Nothing of the refused writes reached the catalog.
    for product_id in ("many", "long", "x", "twice"):
        assert rpc_error(lambda pid=product_id: search_stub.GetProduct(
            pb.GetProductRequest(catalog=CATALOG, product_id=pid), timeout=10)).code() == grpc.StatusCode.NOT_FOUND


def test_index_replace_predicted_category_and_delete_across_replicas(search_stub, other_stub) -> None:  # type: ignore[no-untyped-def]
    """Written through one gateway, read, replaced and deleted through another: both serve one catalog."""
    coffee, cat = photo_bytes("coffee.png"), photo_bytes("chelsea.png")
    first = search_stub.IndexProduct(pb.IndexProductRequest(
        product_id="photo-1", image=coffee, metadata={"sku": "C-1"}, catalog=CATALOG,
        attributes=[pb.Attribute(key="color", value="brown"), pb.Attribute(key="color", value="white")]), timeout=30)
    assert not first.replaced and first.model_version == "1" and first.catalog == CATALOG
    assert first.catalog_size == CATALOG_SIZE + 1
    # No category given: the model's top-1 label is stored, and "@predicted" finds it, on the other replica.
    top = search(other_stub, coffee, k=1, category="@predicted")[0]
    assert (top.product_id, top.label, dict(top.metadata)) == ("photo-1", first.label, {"sku": "C-1"})
    product = other_stub.GetProduct(pb.GetProductRequest(catalog=CATALOG, product_id="photo-1"), timeout=10)
    assert product.image_sha256 == hashlib.sha256(coffee).hexdigest() and product.image_bytes == len(coffee)
    assert [(a.key, a.value) for a in product.attributes] == [("color", "brown"), ("color", "white")]
    assert (product.model, product.model_version, product.category) == (MODEL, "1", first.label)

    second = other_stub.IndexProduct(pb.IndexProductRequest(
        product_id="photo-1", image=cat, category="cats", catalog=CATALOG), timeout=30)
    assert second.replaced and second.label == "cats" and second.catalog_size == CATALOG_SIZE + 1
    top = search(search_stub, cat, k=1)[0]
    assert (top.product_id, top.label) == ("photo-1", "cats") and top.score > 0.99
    assert search(search_stub, coffee, k=1)[0].score < 0.9  # the coffee embedding is gone

    deleted = search_stub.DeleteProduct(pb.DeleteProductRequest(product_id="photo-1", catalog=CATALOG), timeout=10)
    assert deleted.catalog_size == CATALOG_SIZE
    # Deleted before the call returned: no stale hit on either replica.
    for stub in (search_stub, other_stub):
        assert "photo-1" not in {m.product_id for m in search(stub, cat, k=20)}
    for unknown in ("photo-1", "never-indexed"):
        error = rpc_error(lambda u=unknown: other_stub.DeleteProduct(
            pb.DeleteProductRequest(product_id=u, catalog=CATALOG), timeout=10))
        assert error.code() == grpc.StatusCode.NOT_FOUND and unknown in error.details()


def test_near_duplicates_are_reported(search_stub, fashion_catalog: list[CatalogItem]) -> None:  # type: ignore[no-untyped-def]
    item = fashion_catalog[5]
    reply = search_stub.IndexProduct(pb.IndexProductRequest(product_id="dup-of-5", image=item.read(), catalog=CATALOG,
                                                            category=item.category), timeout=30)
    try:
        assert [d.product_id for d in reply.near_duplicates][:1] == [item.product_id]
        assert reply.near_duplicates[0].score == pytest.approx(1.0, abs=5e-3)
        assert "dup-of-5" not in {d.product_id for d in reply.near_duplicates}
        unlike = search_stub.IndexProduct(pb.IndexProductRequest(product_id="not-a-dup", image=photo_bytes(
            "coffee.png"), catalog=CATALOG), timeout=30)
        assert list(unlike.near_duplicates) == []
    finally:
        for product_id in ("dup-of-5", "not-a-dup"):
            search_stub.DeleteProduct(pb.DeleteProductRequest(product_id=product_id, catalog=CATALOG), timeout=10)


def test_list_products_pages_through_the_whole_catalog(other_stub, fashion_catalog: list[CatalogItem]) -> None:  # type: ignore[no-untyped-def]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        reply = other_stub.ListProducts(pb.ListProductsRequest(catalog=CATALOG, page_size=64, page_token=token),
                                        timeout=10)
        seen += [p.product_id for p in reply.products]
        pages += 1
        token = reply.next_page_token
        if not token:
            break
        assert pages < 10
    assert pages == 4 and seen == sorted(i.product_id for i in fashion_catalog)
    error = rpc_error(lambda: other_stub.ListProducts(pb.ListProductsRequest(catalog="other-rpc", page_token=token
                                                                             or "eyJjIjoicnBjIiwiYSI6IngifQ"),
                                                      timeout=10))
    assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


def test_catalogs_are_isolated_and_each_has_its_model(search_stub, fashion_catalog: list[CatalogItem]) -> None:  # type: ignore[no-untyped-def]
    created = search_stub.CreateCatalog(pb.CreateCatalogRequest(name="rpc-isolated", model="fashion_cnn"), timeout=10)
    assert (created.model, created.model_version, created.product_count) == ("fashion_cnn", "", 0)
    item = fashion_catalog[0]
    assert search(search_stub, item.read(), catalog="rpc-isolated") == []  # empty: nothing to compare with
    reply = search_stub.IndexProduct(pb.IndexProductRequest(product_id=item.product_id, image=item.read(),
                                                            catalog="rpc-isolated"), timeout=30)
    assert (reply.model, reply.catalog_size) == ("fashion_cnn", 1)
    # The same id in two catalogs: two products. A's search never returns B's.
    only = search(search_stub, item.read(), k=10, catalog="rpc-isolated")
    assert [m.product_id for m in only] == [item.product_id]
    assert len(search(search_stub, item.read(), k=10)) == 10
    catalogs = {c.name: c for c in search_stub.ListCatalogs(pb.ListCatalogsRequest(), timeout=10).catalogs}
    assert catalogs["rpc-isolated"].model == "fashion_cnn" and catalogs["rpc-isolated"].product_count == 1
    assert catalogs[CATALOG].model == MODEL


def test_index_product_batch_answers_each_item(search_stub) -> None:  # type: ignore[no-untyped-def]
    reply = search_stub.IndexProductBatch(pb.IndexProductBatchRequest(requests=[
        pb.IndexProductRequest(product_id="batch-good", image=photo_bytes("chelsea.png"), catalog=CATALOG),
        pb.IndexProductRequest(product_id="batch-bad", image=b"\x89PNG\r\n\x1a\n nothing", catalog=CATALOG)]),
        timeout=30)
    try:
        assert reply.items[0].WhichOneof("result") == "response" and not reply.items[0].response.replaced
        assert reply.items[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert search(search_stub, photo_bytes("chelsea.png"), k=1)[0].product_id == "batch-good"
    finally:
        search_stub.DeleteProduct(pb.DeleteProductRequest(product_id="batch-good", catalog=CATALOG), timeout=10)


def test_concurrent_searches_during_writes(search_gateway: PrivateGateway,  # type: ignore[no-untyped-def]
                                           other_gateway: PrivateGateway,
                                           fashion_catalog: list[CatalogItem]) -> None:
    """Searches on one replica racing with replaces and deletes on another all succeed and only see whole entries."""
    stable = fashion_catalog[:10]
    churn = fashion_catalog[100:110]
    known = {item.product_id for item in fashion_catalog}

    async def run() -> list[str]:
        problems: list[str] = []
        async with grpc.aio.insecure_channel(search_gateway.address) as reads, \
                grpc.aio.insecure_channel(other_gateway.address) as writes:
            reader = recognition_pb2_grpc.ProductRecognitionStub(reads)
            writer_stub = recognition_pb2_grpc.ProductRecognitionStub(writes)

            async def searcher(item: CatalogItem) -> None:
                for _ in range(3):
                    reply = await reader.SearchSimilar(pb.SearchSimilarRequest(image=item.read(), catalog=CATALOG),
                                                       timeout=60)
                    ids = [m.product_id for m in reply.matches]
                    if ids[0] != item.product_id or len(set(ids)) != len(ids) or not set(ids) <= known:
                        problems.append(f"{item.product_id}: {ids}")

            async def writer(item: CatalogItem, replacement: CatalogItem) -> None:
                request = {"product_id": item.product_id, "catalog": CATALOG,
                           "metadata": {"category": item.category, "source": "fashion-mnist"},
                           "attributes": [pb.Attribute(key=k, value=v) for k, v in item.attributes]}
                await writer_stub.DeleteProduct(pb.DeleteProductRequest(product_id=item.product_id, catalog=CATALOG),
                                                timeout=60)
                await writer_stub.IndexProduct(pb.IndexProductRequest(image=replacement.read(), **request), timeout=60)
                await writer_stub.IndexProduct(pb.IndexProductRequest(image=item.read(), **request), timeout=60)

            await asyncio.gather(*(searcher(item) for item in stable),
                                 *(writer(item, churn[(i + 1) % len(churn)]) for i, item in enumerate(churn)))
            reply = await reader.SearchSimilar(pb.SearchSimilarRequest(image=churn[0].read(), k=1, catalog=CATALOG),
                                               timeout=30)
            if reply.matches[0].product_id != churn[0].product_id:
                problems.append(f"after the writes, {churn[0].product_id} no longer finds itself")
        return problems

    assert asyncio.run(run()) == []


def test_index_catalog_reports_failed_items(search_gateway: PrivateGateway, search_stub, tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "catalog"
    (folder / "mugs").mkdir(parents=True)
    (folder / "mugs" / "good.png").write_bytes(photo_bytes("coffee.png"))
    (folder / "mugs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    state = tmp_path / "state.jsonl"
    args = index_catalog.get_args_parser().parse_args(
        [str(folder), "--gateway", search_gateway.address, "--state", str(state), "--catalog", CATALOG,
         "--no-progress"])
    assert index_catalog.main(args) == 1
    errors = [json.loads(line) for line in state.with_suffix(".errors.jsonl").read_text().splitlines()]
    assert [(e["product_id"], e["code"]) for e in errors] == [("mugs/broken", "INVALID_ARGUMENT")]
    assert [json.loads(line)["product_id"] for line in state.read_text().splitlines()] == ["mugs/good"]
    top = search(search_stub, photo_bytes("coffee.png"), k=1, category="mugs")[0]
    assert top.product_id == "mugs/good" and top.score > 0.99
    search_stub.DeleteProduct(pb.DeleteProductRequest(product_id="mugs/good", catalog=CATALOG), timeout=10)


def test_each_catalog_call_counts_its_upload_once(search_gateway: PrivateGateway, search_stub) -> None:  # type: ignore[no-untyped-def]
    port = search_gateway.stack.ports.gateway_metrics

    def uploads() -> float:
        return value(scrape(port), "shopvision_gateway_image_bytes_count")

    before = uploads()
    search(search_stub, photo_bytes("coffee.png"), k=1)
    assert uploads() - before == 1
    search_stub.IndexProduct(pb.IndexProductRequest(product_id="counted-once", image=photo_bytes("coffee.png"),
                                                    catalog=CATALOG), timeout=30)
    search_stub.DeleteProduct(pb.DeleteProductRequest(product_id="counted-once", catalog=CATALOG), timeout=10)
    assert uploads() - before == 2
