"""The shared load harness: bounded runs, ghz-shaped summaries whose counts add up, right status codes."""
from __future__ import annotations

import asyncio

import pytest
from shopvision.v1 import recognition_pb2

from bench.harness.data import BATCH_CALL, CALL, classify_batch_payloads_from_bytes, classify_payloads_from_bytes
from bench.harness.load import GrpcTarget, Run, closed_loop, open_loop
from bench.harness.summary import ghz_percentiles, latency_ms, ok_rps, summarize
from devstack.stack import Stack, free_port
from tests.conftest import photo_bytes


def test_percentiles_follow_ghz_nearest_rank_rule():
    assert ghz_percentiles([float(v) for v in range(1, 101)], (10, 50, 99)) == [10.0, 50.0, 99.0]
    assert ghz_percentiles([float(v) for v in range(1, 11)], (25, 95)) == [3.0, 10.0]
    assert ghz_percentiles([7.0], (50, 99)) == [7.0, 7.0]


def test_closed_loop_stops_at_the_count_or_the_time_whichever_first():
    calls = []

    async def call(index: int, timeout_s: float) -> None:
        calls.append(index)
        await asyncio.sleep(0.01)

    by_count = asyncio.run(closed_loop(call, concurrency=3, total=10))
    assert len(by_count.results) == 10 and sorted(calls) == list(range(10)) and by_count.end_reason == "normal"
    by_time = asyncio.run(closed_loop(call, concurrency=2, total=None, duration_s=0.3))
    assert by_time.end_reason == "timeout" and 0.25 < by_time.wall_s < 0.6
    assert 20 <= len(by_time.results) <= 70  # ~2 workers x 0.3 s / 10 ms
    with pytest.raises(ValueError):
        asyncio.run(closed_loop(call, concurrency=1, total=None, duration_s=None))


def test_open_loop_keeps_its_schedule_and_counts_queueing_in_latency():
    async def slow(index: int, timeout_s: float) -> None:
        await asyncio.sleep(0.05)

    run = asyncio.run(open_loop(slow, rps=40, total=None, duration_s=0.5, max_in_flight=1))
    # 20 arrivals in 0.5 s; with one slot each waits for the one before, and that wait is latency.
    summary = summarize(run)
    assert summary["count"] == 20
    assert latency_ms(summary, 99) > 300


# -- against the real stack ------------------------------------------------------------------------------------------
@pytest.mark.stack
def test_closed_loop_against_the_stack_counts_ok_and_invalid_argument(stack: Stack):
    good = classify_payloads_from_bytes([photo_bytes("coffee.png")])[0]
    bad = classify_payloads_from_bytes([b"this is not an image"])[0]

    async def go() -> Run:
        async with GrpcTarget(stack.gateway_address, CALL, [good, bad]) as target:
            return await closed_loop(target, concurrency=2, total=8, timeout_s=30)

    summary = summarize(asyncio.run(go()), "mixed", stack.gateway_address, CALL)
    assert summary["count"] == 8
    assert summary["statusCodeDistribution"] == {"OK": 4, "InvalidArgument": 4}
    assert sum(summary["errorDistribution"].values()) == 4
    assert all(key.startswith("rpc error: code = InvalidArgument desc = ") for key in summary["errorDistribution"])
    latencies = [row["latency"] for row in summary["latencyDistribution"]]
    assert [row["percentage"] for row in summary["latencyDistribution"]] == [10, 25, 50, 75, 90, 95, 99]
    assert latencies == sorted(latencies) and summary["fastest"] <= latencies[0] <= latencies[-1] <= summary["slowest"]
    assert summary["rps"] == pytest.approx(8 / (summary["total"] / 1e9))
    assert ok_rps(summary) == pytest.approx(summary["rps"] / 2)
    assert sum(bucket["count"] for bucket in summary["histogram"]) == 4


@pytest.mark.stack
def test_open_loop_against_the_stack(stack: Stack):
    payloads = classify_payloads_from_bytes([photo_bytes("coffee.png")])

    async def go() -> Run:
        async with GrpcTarget(stack.gateway_address, CALL, payloads) as target:
            return await open_loop(target, rps=10, total=5, duration_s=5, timeout_s=30)

    summary = summarize(asyncio.run(go()), "open")
    assert summary["count"] == 5 and summary["statusCodeDistribution"] == {"OK": 5}
    assert summary["endReason"] == "normal"
    assert summary["total"] / 1e9 >= 0.4  # the 5th request is scheduled at 0.4 s


def test_an_unreachable_server_is_counted_as_unavailable():
    payloads = classify_payloads_from_bytes([b"x"])

    async def go() -> Run:
        async with GrpcTarget(f"127.0.0.1:{free_port()}", CALL, payloads) as target:
            return await closed_loop(target, concurrency=1, total=2, timeout_s=5)

    summary = summarize(asyncio.run(go()))
    assert summary["statusCodeDistribution"] == {"Unavailable": 2}
    assert summary["latencyDistribution"] == [] and summary["fastest"] == 0


def test_classify_batch_payloads_rotate_through_the_images():
    payloads = classify_batch_payloads_from_bytes([b"a", b"b", b"c"], items=4, top_k=3)
    requests = [recognition_pb2.ClassifyBatchRequest.FromString(p).requests for p in payloads]
    assert [[r.image for r in batch] for batch in requests] == [
        [b"a", b"b", b"c", b"a"], [b"b", b"c", b"a", b"b"], [b"c", b"a", b"b", b"c"]]
    assert all(r.top_k == 3 for batch in requests for r in batch)


@pytest.mark.stack
def test_a_classify_batch_call_through_the_harness_classifies_every_image(stack: Stack):
    payloads = classify_batch_payloads_from_bytes([photo_bytes("coffee.png"), photo_bytes("chelsea.png")], items=32)

    async def go() -> bytes:
        async with GrpcTarget(stack.gateway_address, BATCH_CALL, payloads) as target:
            return await target(0, 120.0)

    reply = recognition_pb2.ClassifyBatchResponse.FromString(asyncio.run(go()))
    assert len(reply.items) == 32 and not any(item.HasField("error") for item in reply.items)
    labels = [item.response.predictions[0].label for item in reply.items]
    assert labels[::2] == ["espresso"] * 16 and len(set(labels[1::2])) == 1 and labels[1] != "espresso"
