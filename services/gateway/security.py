"""Who may call the gateway, and how often: TLS / mutual TLS, bearer tokens, per-caller rate limits.

* :func:`server_credentials` builds TLS (or, with a client CA, mutual TLS) credentials from the
  certificate files named in :class:`~services.gateway.config.SecurityConfig`.
* :class:`CallerInterceptor` checks ``authorization: Bearer <token>`` against the configured tokens
  (``UNAUTHENTICATED`` otherwise) and applies a per-caller token bucket (``RESOURCE_EXHAUSTED``).
  Health and reflection stay open, so Kubernetes probes and ``grpcurl list`` need no token.

The interceptor sits *inside* :class:`~services.common.errors.ErrorInterceptor`: it raises the
domain exceptions, so refusals are mapped to their status code and counted like any other error.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.common.config import ConfigError
from services.common.errors import Overloaded, Unauthenticated
from services.gateway import metrics
from services.gateway.config import SecurityConfig

LOG = logging.getLogger(__name__)

# Methods reachable without a token and without rate limits (probes, service discovery).
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
AUTHORIZATION_KEY = "authorization"
# The caller the bearer token named, for the call being served ('' when tokens are off): set by
# :class:`CallerInterceptor` around the servicer, read by it (e.g. to keep a caller on one canary version).
authenticated_caller: ContextVar[str] = ContextVar("authenticated_caller", default="")


# -- TLS -------------------------------------------------------------------------------------------------------------
def server_credentials(config: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured (mutual TLS with a client CA); ``None`` for plaintext."""
    if not config.tls_cert:
        return None
    key = Path(config.tls_key).read_bytes()
    chain = Path(config.tls_cert).read_bytes()
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


# -- bearer tokens ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Token:
    caller: str
    digest: bytes  # SHA-256 of the secret: equal-length comparisons that leak neither content nor length

    @classmethod
    def of(cls, caller: str, secret: str) -> Token:
        return cls(caller, hashlib.sha256(secret.encode()).digest())


class TokenSet:
    """The accepted bearer tokens, each with the caller name used for rate limits and logs."""

    def __init__(self, tokens: list[Token]) -> None:
        if not tokens:
            raise ConfigError("token authentication is on but no token is configured")
        self._tokens = tokens

    @classmethod
    def from_config(cls, config: SecurityConfig) -> TokenSet | None:
        tokens: list[Token] = []
        if config.auth_token:
            tokens.append(Token.of("default", config.auth_token))
        if config.auth_tokens_file:
            tokens += parse_tokens_file(Path(config.auth_tokens_file).read_text(), config.auth_tokens_file)
        return cls(tokens) if tokens else None

    def caller_of(self, presented: str) -> str | None:
        """Name of the caller whose token is ``presented``, or ``None``. Compares every token in constant time."""
        candidate = hashlib.sha256(presented.encode()).digest()
        found = None
        for token in self._tokens:
            if hmac.compare_digest(candidate, token.digest) and found is None:
                found = token.caller
        return found


def parse_tokens_file(text: str, source: str = "tokens file") -> list[Token]:
    """One token per line, optionally preceded by a caller name: ``<token>`` or ``<caller> <token>``.

    Blank lines and lines starting with ``#`` are ignored; a caller without a name is ``token-<line>``.
    """
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 2:
            raise ConfigError(f"{source} line {number}: expected '<token>' or '<caller> <token>'")
        caller, secret = (fields[0], fields[1]) if len(fields) == 2 else (f"token-{number}", fields[0])
        if len(secret) < 16:
            raise ConfigError(f"{source} line {number}: token is shorter than 16 characters")
        tokens.append(Token.of(caller, secret))
    return tokens


def bearer_token(metadata: Any) -> str:
    """The token of an ``authorization: Bearer <token>`` header, or ''."""
    for key, value in metadata or ():
        if key == AUTHORIZATION_KEY:
            scheme, _, token = str(value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


# -- rate limits -----------------------------------------------------------------------------------------------------
class RateLimiter:
    """A token bucket per caller: ``rate`` images per second on average, bursts up to ``burst``.

    At most ``max_callers`` buckets are kept (least recently seen dropped first), so a flood of
    distinct peers cannot grow memory without bound.
    """

    def __init__(self, rate: float, burst: int, max_callers: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._max_callers = max_callers
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # caller -> (tokens, updated)

    def take(self, caller: str, cost: float = 1.0) -> None:
        """Spend ``cost`` tokens of ``caller``'s bucket or raise :class:`Overloaded`."""
        now = self._clock()
        tokens, updated = self._buckets.pop(caller, (self.burst, now))
        tokens = min(self.burst, tokens + (now - updated) * self.rate)
        cost = min(cost, self.burst)  # a batch larger than the burst still passes on a full bucket
        if tokens < cost:
            self._remember(caller, tokens, now)
            metrics.RATE_LIMITED.inc()
            wait_s = (cost - tokens) / self.rate
            raise Overloaded(f"caller {caller} is over its rate limit of {self.rate:g} images/s; "
                             f"retry in {wait_s:.2f} s", reason="rate_limited")
        self._remember(caller, tokens - cost, now)

    def _remember(self, caller: str, tokens: float, now: float) -> None:
        self._buckets[caller] = (tokens, now)
        while len(self._buckets) > self._max_callers:
            self._buckets.popitem(last=False)


def peer_identity(context: grpc.aio.ServicerContext) -> str:
    """The caller as the transport sees it: the client certificate's common name, else the peer's IP."""
    auth = context.auth_context() or {}
    names = auth.get("x509_common_name") or auth.get("x509_subject_alternative_name")
    if names:
        return "cn:" + names[0].decode(errors="replace")
    peer = context.peer() or "unknown"  # e.g. "ipv4:127.0.0.1:53012" or "ipv6:[::1]:53012"
    return peer.rpartition(":")[0] or peer


def images_in(request: Any) -> int:
    """Rate-limit cost of a request: the number of images it carries (a batch counts each)."""
    items = getattr(request, "requests", None)
    return max(1, len(items)) if items is not None else 1


# -- the interceptor -------------------------------------------------------------------------------------------------
Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class CallerInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates each call by bearer token (when tokens are configured) and rate-limits it per caller."""

    def __init__(self, tokens: TokenSet | None, limiter: RateLimiter | None) -> None:
        self._tokens = tokens
        self._limiter = limiter

    @property
    def authenticates(self) -> bool:
        return self._tokens is not None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        caller = None
        if self._tokens is not None:
            caller = self._tokens.caller_of(bearer_token(handler_call_details.invocation_metadata))
            if caller is None:
                metrics.AUTH_FAILURES.inc()
                return _refusal(handler)
        if handler.unary_unary is None or (self._limiter is None and caller is None):
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._limited(handler.unary_unary, caller),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _limited(self, behavior: Behavior, caller: str | None) -> Behavior:
        """``behavior`` run with ``authenticated_caller`` set, after the caller's rate limit (when there is one)."""
        limiter = self._limiter

        async def limited(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if limiter is not None:
                limiter.take(caller or peer_identity(context), images_in(request))
            token = authenticated_caller.set(caller or "")
            try:
                return await behavior(request, context)
            finally:
                authenticated_caller.reset(token)

        return limited


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind that refuses the call; the request body is never parsed."""
    message = "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'"

    def ignore(raw: bytes) -> None:
        return None

    if handler.unary_unary is not None:
        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            raise Unauthenticated(message, reason="unauthenticated")

        return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=ignore,
                                                   response_serializer=handler.response_serializer)

    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    factory = (grpc.unary_stream_rpc_method_handler if handler.unary_stream is not None
               else grpc.stream_unary_rpc_method_handler if handler.stream_unary is not None
               else grpc.stream_stream_rpc_method_handler)
    return factory(abort, request_deserializer=ignore, response_serializer=handler.response_serializer)
