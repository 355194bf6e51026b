"""Which broker channel each sealed request travels on, decided here once for both sides.

A pool has two channels: the **job queue**, where competing workers each take a share of the
requests, and the **control channel**, a broadcast that every worker of the pool receives; each
of its pipelines adds a **stream** of events (competing workers, like the job queue).
Model uploads and deletes must reach every worker (any of them may later get a job for the
model), so they are broadcast; everything else is work for one worker. The producer publishes
by :func:`route_for`; the worker accepts a request only on the channel this table names, so a
broker that moves a request to the other channel gets it refused, not run by every worker.
"""

from __future__ import annotations

from enum import StrEnum

from .errors import MalformedMessage


class Route(StrEnum):
    JOBS = "jobs"          # one worker of the pool takes it
    BROADCAST = "control"  # every worker of the pool gets it
    STREAM = "stream"      # a pipeline's event stream: one worker of the pool takes each event


_ROUTES: dict[str, Route] = {
    "job": Route.JOBS,
    "job_frame": Route.JOBS,  # many jobs of one model in one request (protocol.frames)
    "model_list": Route.JOBS,
    "pool_rotate": Route.JOBS,
    "model_chunk": Route.BROADCAST,
    "model_delete": Route.BROADCAST,
    # Pipelines (docs/pipelines.md): definitions and deletes reach every worker, as models do;
    # events arrive on the pipeline's stream, published to its source topic.
    "pipeline_put": Route.BROADCAST,
    "pipeline_delete": Route.BROADCAST,
    "pipeline_list": Route.JOBS,
    "event": Route.STREAM,
    # Status is per member: every worker answers (the producer collects the answers for a short
    # window instead of taking the first, producer_sdk.AsyncClient.pool_status).
    "pool_status": Route.BROADCAST,
}

REQUEST_KINDS = frozenset(_ROUTES)


def route_for(kind: str) -> Route:
    """The channel a request of ``kind`` is published on and accepted from."""
    try:
        return _ROUTES[kind]
    except KeyError:
        raise MalformedMessage(f"request type {kind!r} has no route") from None
