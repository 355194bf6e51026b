"""The pool's control channel, worker side: one handler per clear-text message type, in one table.

Every message on the control channel is written by whoever can publish to the broker, so each
handler checks before it acts. What arrives here: producers' attestation challenges, joiners'
join requests, members' model-sync requests and epoch announcements, and the sealed uploads and
deletes that are broadcast to every worker (handed back to the worker's request path, which
checks that their kind belongs on this channel). Anything else is acknowledged and ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from attestation.providers.errors import ProviderError
from broker_adapters import Delivery, Message
from broker_adapters.errors import BrokerError
from protocol.errors import ProtocolError
from protocol.handshake import (SEALED_REQUEST, Challenge, ControlError, EpochAnnounce, JoinRequest,
                                ModelSyncRequest, control_kind)

from .attester import Attester
from .context import WorkerContext
from .membership import Membership
from .model_sync import ModelSync
from .rotation import Rotation

log = logging.getLogger("enclaveq.worker")

ControlHandler = Callable[[Delivery], Awaitable[bytes | None]]


class ControlChannel:
    def __init__(self, ctx: WorkerContext, *, attester: Attester, membership: Membership, rotation: Rotation,
                 serve_broadcast: Callable[[Delivery], Awaitable[None]]) -> None:
        self._ctx = ctx
        self._attester = attester
        self._membership = membership
        self._rotation = rotation
        self._serve_broadcast = serve_broadcast
        self._model_sync: ModelSync | None = None  # set once the worker's models are loaded
        self._handlers: dict[str, ControlHandler] = {
            SEALED_REQUEST: self._broadcast_request,
            "challenge": self._answer_challenge,
            "join_request": self._answer_join,
            "model_sync_request": self._answer_model_sync,
            "epoch_announce": self._take_epoch_announce,
        }

    def serve_model_sync(self, model_sync: ModelSync) -> None:
        """Answer other members' model-sync requests from now on (the worker's models are loaded)."""
        self._model_sync = model_sync

    async def on_message(self, delivery: Delivery) -> None:
        """Dispatch a control-channel message by its declared type; answer it when it asks."""
        msg = delivery.message
        try:
            kind = control_kind(msg.body, max_bytes=self._ctx.config.max_message_bytes)
            handler = self._handlers.get(kind)
            if handler is None:
                await delivery.ack()  # other workers' or future control traffic
                return
            reply = await handler(delivery)
        except ProtocolError as exc:
            reply = ControlError(code="malformed", message=str(exc)).to_bytes()
        except ProviderError as exc:
            # The TEE would not produce evidence (device busy, kernel error): say so to the
            # producer, whose connect then fails clearly, instead of redelivering forever.
            log.error("could not obtain evidence from the TEE: %s", exc)
            reply = ControlError(code="evidence_unavailable", message=str(exc)).to_bytes()
        if delivery.settled:
            return
        if reply is not None and msg.reply_to:
            try:
                await self._ctx.broker.publish_reply(msg.reply_to, Message(body=reply,
                                                                           correlation_id=msg.correlation_id))
            except BrokerError as exc:
                log.warning("could not answer a control message: %s", exc)
        await delivery.ack()

    async def _broadcast_request(self, delivery: Delivery) -> bytes | None:
        await self._serve_broadcast(delivery)
        return None

    async def _answer_challenge(self, delivery: Delivery) -> bytes:
        # A real TEE can take a second to produce a quote: keep the event loop serving jobs.
        challenge = Challenge.from_bytes(delivery.message.body)
        return (await self._attester.answer_in_thread(challenge)).to_bytes()

    async def _answer_join(self, delivery: Delivery) -> bytes | None:
        request = JoinRequest.from_bytes(delivery.message.body)
        if request.worker_id == self._ctx.worker_id:
            return None  # our own broadcast
        return await self._membership.answer_join(request)

    async def _answer_model_sync(self, delivery: Delivery) -> bytes | None:
        request = ModelSyncRequest.from_bytes(delivery.message.body)
        reply_to = delivery.message.reply_to
        if reply_to and self._model_sync is not None and self._model_sync.should_answer(request):
            try:
                await self._model_sync.send(request, reply_to)
            except BrokerError as exc:
                # The requester is gone (or took another copy): never requeue, which would hand
                # the request straight back to us to re-read every model again.
                log.info("model sync for worker %s abandoned: %s", request.worker_id, exc)
        return None

    async def _take_epoch_announce(self, delivery: Delivery) -> bytes | None:
        await self._rotation.on_announce(EpochAnnounce.from_bytes(delivery.message.body))
        return None
