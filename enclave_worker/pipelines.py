"""Pipelines a worker serves: owner-signed definitions, their event streams, running the chain.

A pipeline (docs/pipelines.md) is an owner-signed chain of models that the pool runs on events
published to a topic; its results are sealed to named recipients. This module owns, per worker:

- the definitions in force (``SignedPipeline``), persisted in sealed state, with the ownership
  rules of models: only a strictly newer definition signed by the same owner replaces one, and a
  delete order is kept so that an older definition replayed later stays refused;
- the check at installation that every stage model is here and that the wiring type-checks
  against the real ONNX graphs (``check_stage_mapping``), so a bad pipeline fails when it is
  created rather than on its first event;
- running the chain inside the worker (intermediate tensors never leave it), evaluating ``when``,
  and sealing the result for the recipients (``protocol.results``).

Consuming the streams is the worker's job (``Worker``); this class tells it which to consume.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol import bodies
from protocol.errors import ProtocolError, SignatureInvalid
from protocol.pipeline import (
    PipelineDelete,
    PipelineError,
    PipelineSpec,
    Reference,
    SignedPipeline,
    check_stage_mapping,
)
from protocol.results import PipelineResult, seal_result_for_recipients

from .errors import InputRejected, JobRejected
from .model_library import ModelLibrary
from .models import run_model
from .sealed_state import SealedState

log = logging.getLogger("enclaveq.worker")

UNKNOWN_PIPELINE = bodies.ErrorCode.UNKNOWN_PIPELINE
PIPELINE_INVALID = bodies.ErrorCode.PIPELINE_INVALID


class PipelineLibrary:
    def __init__(self, state: SealedState, *, models: ModelLibrary,
                 on_installed: Callable[[SignedPipeline], Awaitable[None]],
                 on_removed: Callable[[str], Awaitable[None]],
                 clock: Callable[[], float] = time.time) -> None:
        self._state = state
        self._models = models
        self._on_installed = on_installed
        self._on_removed = on_removed
        self._clock = clock
        self._pipelines: dict[str, SignedPipeline] = {}
        self._deleted: dict[str, PipelineDelete] = {}
        # What each pipeline's events must carry (from its type check), for producers to read.
        self._event_inputs: dict[str, tuple[tuple[str, str, tuple[int | None, ...] | None], ...]] = {}

    # -- state ------------------------------------------------------------------------------
    def load_sealed(self) -> None:
        """Read the definitions (and delete orders) sealed by an earlier run of this worker."""
        for pipeline_id, blob in self._state.iter_pipelines():
            try:
                if blob[:1] == b"D":
                    order = PipelineDelete.from_bytes(blob[1:])
                    self._deleted[order.pipeline_id] = order
                else:
                    signed = SignedPipeline.from_bytes(blob[1:])
                    self._pipelines[signed.pipeline_id] = signed
            except ProtocolError as exc:
                # Sealed by us, so only a bug or another worker version: skip it, say which.
                log.warning("sealed pipeline %s is unreadable (%s); ignored", pipeline_id, type(exc).__name__)

    async def check_restored(self) -> None:
        """Type-check the definitions ``load_sealed`` restored against the models now loaded (and
        learn what their events carry); one whose models are gone is kept but reported."""
        for pid, signed in self._pipelines.items():
            try:
                self._event_inputs[pid] = await self._check_models(signed.spec)
            except JobRejected as exc:
                log.warning("restored pipeline %s cannot run: %s", pid, exc)

    @property
    def pipelines(self) -> dict[str, SignedPipeline]:
        return dict(self._pipelines)

    def list(self) -> list[bodies.PipelineInfo]:
        return [bodies.PipelineInfo(
            pipeline_id=pid, name=p.spec.name, owner=p.owner_key.hex(), issued_ms=p.issued_ms,
            source=p.spec.source_topic, sink=p.spec.sink_topic, models=p.spec.model_ids,
            recipients=len(p.spec.recipients), event_inputs=self._event_inputs.get(pid, ()),
            source_exchange=p.spec.source_exchange, sink_exchange=p.spec.sink_exchange)
            for pid, p in sorted(self._pipelines.items())]

    def get(self, pipeline_id: str) -> SignedPipeline:
        signed = self._pipelines.get(pipeline_id)
        if signed is None:
            raise JobRejected(f"pipeline {pipeline_id} is not defined on this pool", UNKNOWN_PIPELINE)
        return signed

    # -- owner requests -----------------------------------------------------------------------
    async def put(self, blob: bytes) -> str:
        """Install an owner-signed definition; returns its id. Typed refusals only."""
        try:
            signed = SignedPipeline.from_bytes(blob)
        except SignatureInvalid as exc:
            raise JobRejected(f"the pipeline definition is refused: {exc}", bodies.ErrorCode.BAD_SIGNATURE) from None
        except ProtocolError as exc:
            raise JobRejected(f"the pipeline definition is refused: {exc}", PIPELINE_INVALID) from None
        pid = signed.pipeline_id
        current = self._pipelines.get(pid)
        deleted = self._deleted.get(pid)
        if not signed.replaces(current) or (deleted is not None and deleted.issued_ms >= signed.issued_ms):
            raise JobRejected(f"pipeline {pid}: a definition at least as new is in force or was deleted",
                              bodies.ErrorCode.STALE_ORDER)
        if current is not None and (current.spec.source_topic, current.spec.sink_topic) != (
                signed.spec.source_topic, signed.spec.sink_topic):
            # Workers consume the stream bound to the first definition's source; a new filter
            # would need the queues rebound. Delete the pipeline and create it again instead.
            raise JobRejected(f"pipeline {pid}: a replacement may not change its source or sink topic",
                              PIPELINE_INVALID)
        self._event_inputs[pid] = await self._check_models(signed.spec)
        self._state.save_pipeline(pid, b"P" + signed.to_bytes())
        self._pipelines[pid] = signed
        self._deleted.pop(pid, None)
        if current is None:
            try:
                await self._on_installed(signed)
            except BaseException:
                # Not served, so not in force: the owner's retry must find no definition
                # "at least as new" standing in its way, and a restart must not revive it.
                del self._pipelines[pid]
                self._event_inputs.pop(pid, None)
                if deleted is None:
                    self._state.forget_pipeline(pid)
                else:  # the older delete order stays in force, on disk too
                    self._state.save_pipeline(pid, b"D" + deleted.to_bytes())
                    self._deleted[pid] = deleted
                raise
        log.info("pipeline %s (%s) installed: %d stages", pid, signed.spec.name, len(signed.spec.stages))
        return pid

    async def delete(self, blob: bytes) -> str:
        try:
            order = PipelineDelete.from_bytes(blob)
        except ProtocolError as exc:
            raise JobRejected(f"the pipeline delete order is refused: {exc}", bodies.ErrorCode.BAD_SIGNATURE) from None
        current = self._pipelines.get(order.pipeline_id)
        if current is None:
            raise JobRejected(f"pipeline {order.pipeline_id} is not defined on this pool", UNKNOWN_PIPELINE)
        if order.owner_key != current.owner_key:
            raise JobRejected("only the pipeline's owner may delete it", bodies.ErrorCode.NOT_OWNER)
        if not order.deletes(current):
            raise JobRejected("the delete order is older than the definition in force", bodies.ErrorCode.STALE_ORDER)
        self._state.save_pipeline(order.pipeline_id, b"D" + order.to_bytes())
        del self._pipelines[order.pipeline_id]
        self._deleted[order.pipeline_id] = order
        log.info("pipeline %s deleted by its owner", order.pipeline_id)
        await self._on_removed(order.pipeline_id)
        return order.pipeline_id

    async def _check_models(self, spec: PipelineSpec) -> tuple[tuple[str, str, tuple[int | None, ...] | None], ...]:
        signatures = {}
        for model_id in set(spec.model_ids):
            try:
                # As a job does, wait a while for a model still arriving on this worker: uploads
                # reach every worker, and `pipeline create` installs the definition as soon as
                # one worker confirmed the upload, so another may still be storing it.
                info = (await self._models.get(model_id)).info
            except JobRejected:
                raise JobRejected(f"stage model {model_id} is not on this pool: upload it first",
                                  bodies.ErrorCode.UNKNOWN_MODEL) from None
            signatures[model_id] = ({name: (t, shape) for name, t, shape in info.inputs},
                                    {name: (t, shape) for name, t, shape in info.outputs})
        try:
            wanted = check_stage_mapping(spec, signatures)
        except PipelineError as exc:
            raise JobRejected(f"the pipeline does not type-check: {exc}", PIPELINE_INVALID) from None
        return tuple((name, dtype, None if shape is None else tuple(d if isinstance(d, int) else None for d in shape))
                     for name, (dtype, shape) in sorted(wanted.items()))

    # -- events -------------------------------------------------------------------------------
    async def run(self, spec: PipelineSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """Run the chain on one event's inputs; None when ``when`` says the event does not match."""
        missing = sorted(set(spec.event_inputs) - set(inputs))
        extra = sorted(set(inputs) - set(spec.event_inputs))
        if missing or extra:
            raise InputRejected(f"the pipeline takes event inputs {list(spec.event_inputs)}; "
                                f"missing {missing}, unexpected {extra}")
        values: dict[Reference, np.ndarray] = {Reference("event", name): array for name, array in inputs.items()}
        for stage in spec.stages:
            model = await self._models.get(stage.model)
            feed = {name: values[ref] for name, ref in stage.inputs}
            # Off the event loop: a stage may take milliseconds or seconds.
            outputs = await asyncio.to_thread(run_model, model, feed, None)
            for name, value in outputs.items():
                values[Reference(stage.name, name)] = np.asarray(value)
        if spec.when is not None:
            flag = values[spec.when]
            if flag.size != 1 or flag.dtype != np.bool_:
                raise InputRejected(f"the pipeline's condition {spec.when} must be one boolean, got "
                                    f"{flag.dtype} of shape {list(flag.shape)}")
            if not bool(flag.reshape(())):
                return None
        return {name: values[ref] for name, ref in spec.outputs}

    def seal(self, signed: SignedPipeline, *, event_id: str, publisher: bytes, pool: str, epoch: int,
             pool_private_key: X25519PrivateKey, outputs: Mapping[str, np.ndarray],
             rng: Callable[[int], bytes]) -> bytes:
        result = PipelineResult(pipeline_id=signed.pipeline_id, event_id=event_id,
                                stage_models=signed.spec.model_ids, publisher=publisher, pool=pool, epoch=epoch,
                                produced_ms=int(self._clock() * 1000), outputs=outputs)
        return seal_result_for_recipients(result, signed.spec.recipients, pool_private_key, rng=rng)


__all__ = ["PipelineLibrary", "UNKNOWN_PIPELINE", "PIPELINE_INVALID"]
