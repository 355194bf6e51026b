"""Connecting to one of several RabbitMQ nodes (a cluster), and failing over between them.

aio-pika's robust connection reconnects to the one URL it was made with; a cluster node that
died (SIGKILL, a lost host) would keep it retrying a dead address forever while the other
nodes serve the pool's quorum queues. :class:`FailoverConnection` keeps aio-pika's whole
reconnect machinery (channel and consumer restore, reconnect callbacks) and changes only the
address: every reconnect attempt after the first connection goes to the next node of the list,
round robin, so a client rides out the loss of any node while another one is up.

:func:`connect_first` makes the first connection: it tries the nodes in order and keeps the
first that answers (each with the usual connect timeout), so a node that is down when a
client starts is skipped too. A one-URL list behaves exactly as ``aio_pika.connect_robust``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from aio_pika import RobustConnection
from yarl import URL

from .urls import redact_url

log = logging.getLogger("enclaveq.broker")

__all__ = ["FailoverConnection", "connect_first"]


class FailoverConnection(RobustConnection):
    """A robust connection whose reconnect attempts cycle through ``node_urls``.

    aio-pika clears ``transport`` at the start of every connection attempt (and on close); that
    assignment is the one hook it offers, so the address moves on there, once this connection
    has been up."""

    def __init__(self, url: URL, *, node_urls: Sequence[str], **kwargs: Any) -> None:
        self._node_urls = [URL(u) for u in node_urls]
        self._node = 0
        self._was_up = False
        super().__init__(url, **kwargs)

    @property
    def transport(self) -> Any:
        return self.__dict__.get("_failover_transport")

    @transport.setter
    def transport(self, value: Any) -> None:
        if value is None and self.__dict__.get("_was_up") and len(self._node_urls) > 1:
            self._node = (self._node + 1) % len(self._node_urls)
            self.url = self._node_urls[self._node]
            log.debug("next connection attempt goes to %s", redact_url(str(self.url)))
        elif value is not None:
            self._was_up = True
        self.__dict__["_failover_transport"] = value


async def connect_first(node_urls: Sequence[str], *, timeout: float, **kwargs: Any) -> RobustConnection:
    """A connected :class:`FailoverConnection` to the first of ``node_urls`` that answers. Raises
    the last node's error when none does (the caller words it)."""
    last: BaseException | None = None
    for index in range(len(node_urls)):
        order = [*node_urls[index:], *node_urls[:index]]  # later reconnects start after this node
        conn = FailoverConnection(URL(order[0]), node_urls=order, **kwargs)
        try:
            await conn.connect(timeout=timeout)
            return conn
        except BaseException as exc:
            last = exc
            try:
                await conn.close()
            except Exception:  # noqa: S110 - nothing to close on a connection that never came up
                pass
            if not isinstance(exc, Exception) or index == len(node_urls) - 1:
                raise
            log.info("node %s unavailable (%s); trying the next", redact_url(order[0]), type(exc).__name__)
    raise AssertionError(f"unreachable: {last!r}")
