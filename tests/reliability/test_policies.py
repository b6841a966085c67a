"""The pure parts of the reliability and security code: retry budget and policy, rate limiter, tokens."""
from __future__ import annotations

import asyncio
import random

import pytest

from services.common.config import ConfigError
from services.common.errors import Overloaded
from services.gateway.config import SecurityConfig, is_loopback
from services.gateway.retry import Retrier, RetryBudget, RetryPolicy, RetryWindowElapsed
from services.gateway.security import RateLimiter, TokenSet, bearer_token, parse_tokens_file
from services.preprocess.config import PreprocessConfig
from services.triton.config import TritonConfig


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_retry_budget_allows_a_ratio_of_calls_plus_a_floor() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=1.0, cap=10.0, clock=clock)
    for _ in range(100):  # 100 calls in the same instant: 1 saved up + 0.2 each, capped at 10
        budget.deposit()
    spent = sum(budget.try_spend() for _ in range(100))
    assert spent == 10
    clock.now += 3.0  # the floor refills 1 per second
    assert sum(budget.try_spend() for _ in range(100)) == 3


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.5, multiplier=2.0)
    rng = random.Random(1)
    for retry, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)]:
        pauses = [policy.backoff(retry, rng) for _ in range(200)]
        assert 0.0 <= min(pauses) and max(pauses) <= cap
        assert max(pauses) > 0.8 * cap  # spread over the whole range


class Flaky(Exception):
    pass


class Timeout(Exception):
    pass


def run(retrier: Retrier, failures: list[Exception], timeout_s: float = 5.0) -> tuple[object, list[int]]:
    attempts: list[int] = []

    async def attempt(number: int, timeout: float) -> str:
        attempts.append(number)
        if failures:
            raise failures.pop(0)
        return "done"

    result = asyncio.run(retrier.call(attempt, timeout_s, retryable=lambda e: isinstance(e, Flaky),
                                      is_timeout=lambda e: isinstance(e, Timeout)))
    return result, attempts


def fast_retrier(**policy: float) -> Retrier:
    return Retrier("test", RetryPolicy(initial_backoff_s=0.001, **policy), RetryBudget(ratio=1.0, min_per_s=100.0),
                   random.Random(0))


def test_retrier_retries_only_retryable_errors_up_to_max_attempts() -> None:
    assert run(fast_retrier(max_attempts=3), [Flaky(), Flaky()]) == ("done", [0, 1, 2])
    with pytest.raises(Flaky):
        run(fast_retrier(max_attempts=3), [Flaky(), Flaky(), Flaky()])
    with pytest.raises(ValueError):
        run(fast_retrier(max_attempts=3), [ValueError("not retryable")])


def test_retrier_stops_when_the_budget_is_empty() -> None:
    retrier = Retrier("test", RetryPolicy(initial_backoff_s=0.001), RetryBudget(ratio=0.0, min_per_s=0.0),
                      random.Random(0))
    with pytest.raises(Flaky):
        run(retrier, [Flaky()])


def test_a_retry_cut_by_the_window_is_reported_as_such() -> None:
    with pytest.raises(RetryWindowElapsed):
        run(fast_retrier(window_s=1.0), [Flaky(), Timeout()], timeout_s=10.0)
    # A timeout of the call's own deadline stays a timeout.
    with pytest.raises(Timeout):
        run(fast_retrier(window_s=1.0), [Timeout()], timeout_s=10.0)


def test_rate_limiter_is_a_token_bucket_per_caller() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    for _ in range(3):
        limiter.take("a")
    with pytest.raises(Overloaded) as info:
        limiter.take("a")
    assert info.value.reason == "rate_limited" and "retry in 0.50 s" in info.value.message
    limiter.take("b")  # another caller has its own bucket
    clock.now += 0.5
    limiter.take("a")  # one token back after 1/rate seconds
    limiter.take("b", cost=40)  # a batch larger than the burst passes on a full bucket...
    with pytest.raises(Overloaded):
        limiter.take("b")  # ...and empties it


def test_rate_limiter_forgets_the_least_recent_callers() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_callers=100)
    for i in range(1000):
        limiter.take(f"peer-{i}")
    assert len(limiter._buckets) == 100


def test_tokens_file_and_bearer_header() -> None:
    tokens = parse_tokens_file("# comment\n\nalice aaaaaaaaaaaaaaaaaaaa\nbbbbbbbbbbbbbbbbbbbbbbbb\n")
    assert [t.caller for t in tokens] == ["alice", "token-4"]
    token_set = TokenSet(tokens)
    assert token_set.caller_of("aaaaaaaaaaaaaaaaaaaa") == "alice"
    assert token_set.caller_of("bbbbbbbbbbbbbbbbbbbbbbbb") == "token-4"
    assert token_set.caller_of("aaaaaaaaaaaaaaaaaaab") is None and token_set.caller_of("") is None
    with pytest.raises(ConfigError, match="line 1"):
        parse_tokens_file("short")
    with pytest.raises(ConfigError, match="line 2"):
        parse_tokens_file("\na b c")
    assert bearer_token([("authorization", "Bearer  xyz ")]) == "xyz"
    assert bearer_token([("authorization", "bearer xyz")]) == "xyz"
    assert bearer_token([("authorization", "Basic xyz")]) == ""
    assert bearer_token([("x-other", "Bearer xyz")]) == "" and bearer_token(None) == ""
    assert TokenSet.from_config(SecurityConfig.from_env({})) is None


def test_internal_services_bind_loopback_by_default() -> None:
    assert is_loopback(PreprocessConfig.from_env({}).address)
    assert TritonConfig.from_env({}).host == "127.0.0.1"
    assert is_loopback("127.0.0.1:1") and is_loopback("[::1]:1") and is_loopback("localhost:1")
    assert not is_loopback("0.0.0.0:1") and not is_loopback("10.0.0.5:1") and not is_loopback("gateway:1")
