"""Channels from the gateway to preprocess and Triton, balanced over every address an upstream name resolves to.

A target is any gRPC target string: ``host:port`` (resolved through DNS, as before), ``dns:///host:port``,
``dns://DNS_SERVER:PORT/host:port`` or a fixed list ``ipv4:10.0.0.1:50052,10.0.0.2:50052``.

gRPC's default policy (``pick_first``) sends every call over one connection, so behind a headless Service a
gateway would stick to one replica. ``round_robin`` keeps a connection to every resolved address and rotates the
calls over the ready ones; one that fails is skipped at once, which is what lets a retry land on a live replica.

gRPC's DNS resolver only looks the name up again when a connection drops, so a replica added at run time would
never be dialled by a running gateway. :class:`RenewingChannel` therefore replaces the channel every
``renew_every_s`` with a fresh one (a fresh resolution). The fresh channel reuses the open connections (gRPC
shares subchannels between channels with the same target arguments), so a renewal costs one DNS lookup, and the
old channel is closed only once the calls already on it have finished. This works whatever the server side is
configured to do: Triton 2.51 can age connections out (``--grpc-max-connection-age``), but that is a flag of
however Triton is launched, not something the gateway can rely on.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import grpc

LOG = logging.getLogger(__name__)

ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
# How often an upstream name is resolved afresh: a replica added at run time gets calls within this (plus the DNS
# record's TTL, 5 s for a Kubernetes headless Service), for one DNS lookup per upstream every few seconds.
RENEW_EVERY_S = 5.0
# A retired channel waits this long for its calls before cancelling them: longer than any call the gateway
# makes (the servicer caps a caller's deadline at 24 h), so in practice it closes when the last call ends.
RETIRED_CALLS_GRACE_S = 24 * 3600.0

T = TypeVar("T")


def channel_options(max_send_bytes: int, max_receive_bytes: int = 64 * 1024 * 1024,
                    max_pings_without_data: int = 0) -> list[tuple[str, str | int]]:
    """Options of an upstream channel: round robin, fast reconnects, keepalive, re-resolution, message limits.

    ``max_pings_without_data``: keepalive pings sent on a connection that carries no calls (0: no limit). A server
    that does not permit pings between calls counts each one after the first as a strike and closes the connection
    (GOAWAY "too_many_pings") after two: give such a server 2.
    """
    return [
        # The service config wins over ``grpc.lb_policy_name``; a TXT record cannot override it (gRPC does not
        # look service configs up in DNS unless asked to).
        ("grpc.service_config", ROUND_ROBIN),
        # Reconnect quickly after a replica restarts; the default backoff grows to two minutes.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        # A replica that vanished without closing its connections (node lost) is noticed within 15 s, on an idle
        # connection too where the server permits it (services/common/grpc_server.py does for preprocess).
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", max_pings_without_data),
        # A dropped connection makes round robin ask for a new resolution; the default spaces them 30 s apart.
        ("grpc.dns_min_time_between_resolutions_ms", 1_000),
        ("grpc.max_send_message_length", max_send_bytes),
        ("grpc.max_receive_message_length", max_receive_bytes),
    ]


class RenewingChannel(Generic[T]):
    """A client of one upstream (``make()`` builds it, ``channel_of`` names its channel) that is rebuilt from a
    fresh name resolution every ``renew_every_s`` (0: never). :meth:`get` returns the client to call now."""

    def __init__(self, upstream: str, make: Callable[[], T], channel_of: Callable[[T], grpc.aio.Channel],
                 renew_every_s: float, connect_timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.upstream = upstream
        self._make = make
        self._channel_of = channel_of
        self._renew_every_s = renew_every_s
        self._connect_timeout_s = connect_timeout_s
        self._clock = clock
        self._current = make()
        self._since = clock()
        self._renewal: asyncio.Task[None] | None = None
        self._retiring: dict[grpc.aio.Channel, asyncio.Task[None]] = {}
        self.renewals = 0

    def get(self) -> T:
        """The current client; starts a renewal in the background when one is due (the caller never waits)."""
        if (self._renew_every_s > 0 and self._renewal is None
                and self._clock() - self._since >= self._renew_every_s):
            self._renewal = asyncio.get_running_loop().create_task(self._renew())
        return self._current

    async def _renew(self) -> None:
        fresh = self._make()
        channel = self._channel_of(fresh)
        ready = False
        try:
            await asyncio.wait_for(channel.channel_ready(), self._connect_timeout_s)
            ready = True
        except TimeoutError:
            # Nothing answers at the fresh resolution (upstream down, DNS failing): keep the channel we have, which
            # goes on reconnecting by itself, and try again next period.
            LOG.info("%s: no address of a fresh resolution became ready in %.1f s; keeping the current channel",
                     self.upstream, self._connect_timeout_s)
        finally:
            self._since = self._clock()
            self._renewal = None
            if not ready:  # timed out, or cancelled by close()
                await channel.close()
        if not ready:
            return
        old, self._current = self._current, fresh
        self.renewals += 1
        LOG.debug("%s: channel renewed from a fresh resolution", self.upstream)
        # A closing channel takes no new call but lets the ones on it finish (in-flight inferences, retries
        # already sent); each new call reads :meth:`get` and goes to the fresh channel.
        retired = self._channel_of(old)
        retiring = asyncio.get_running_loop().create_task(retired.close(RETIRED_CALLS_GRACE_S))
        self._retiring[retired] = retiring
        retiring.add_done_callback(lambda _: self._retiring.pop(retired, None))

    async def close(self, retired_wait_s: float = 1.0) -> None:
        """Close the current channel now (calls still on it are cancelled). Channels retired by a renewal are
        already closing: they end with their last call, which a server shutdown has finished or cancelled by the
        time this runs; they get ``retired_wait_s`` to do so (a closing gRPC channel cannot be closed harder)."""
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
        await self._channel_of(self._current).close()
        if self._retiring:
            await asyncio.wait(list(self._retiring.values()), timeout=retired_wait_s)
