"""The pool's control channel, worker side: one handler per clear-text message type, in one table.

Every message on the control channel is written by whoever can publish to the broker, so each
handler checks before it acts. What arrives here: producers' attestation challenges, joiners'
join requests, members' model-sync requests and epoch announcements, and the sealed uploads and
deletes that are broadcast to every worker (handed back to the worker's request path, which
checks that their kind belongs on this channel). Anything else is acknowledged and ignored.

What one message may cost, before anything in it is trusted:

* its size decides how it may be read. A clear control message is at most
  ``CLEAR_CONTROL_MAX_BYTES``; only a sealed request envelope (a model chunk) may be larger, and
  a larger message is read only as one -- by the request path, with its own limits -- and only
  if it starts like one; anything else that large is acknowledged and dropped unread;
* evidence in answer (a challenge, a join request) and checks of unsolicited peer evidence (a
  join request, an epoch announcement) draw on the attester's budgets; over them, the answer is
  a ``busy`` ControlError (a small publish) and the work is not done.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from attestation.providers.errors import ProviderError
from broker_adapters import Delivery, Message
from broker_adapters.errors import BrokerError
from protocol.envelope import encode_envelope
from protocol.errors import ProtocolError
from protocol.handshake import (MAX_EVIDENCE_BYTES, SEALED_REQUEST, Challenge, ControlError, EpochAnnounce,
                                JoinRequest, ModelSyncRequest, control_kind)

from .attester import Attester
from .budget import OverBudget
from .context import WorkerContext
from .membership import Membership
from .model_sync import ModelSync
from .rotation import Rotation

log = logging.getLogger("enclaveq.worker")

ControlHandler = Callable[[Delivery], Awaitable[bytes | None]]

# The largest clear control message: a join response (evidence plus at most 24 KiB); the others
# are smaller (an announcement or join request: evidence plus a few KiB; a model-sync request
# lists at most MAX_SYNC_HAVE model ids, ~70 KiB). Every kind's parser then enforces its own limit.
CLEAR_CONTROL_MAX_BYTES = MAX_EVIDENCE_BYTES + 32 * 1024
# How every sealed request envelope begins (protocol.envelope.encode_envelope: a 4-entry map whose
# first entries are "v": 1 and "h"). Only uploads are larger than a clear message, and only the
# SDK's encoder writes them; a large message without this prefix is not worth decoding.
ENVELOPE_PREFIX = encode_envelope(b"", b"", b"")[:6]
MAX_ERROR_CHARS = 1024  # of an error's text put in a ControlError (which carries 2048 at most)


class ControlChannel:
    def __init__(self, ctx: WorkerContext, *, attester: Attester, membership: Membership, rotation: Rotation,
                 serve_broadcast: Callable[[Delivery], Awaitable[None]]) -> None:
        self._ctx = ctx
        self._attester = attester
        self._membership = membership
        self._rotation = rotation
        self._serve_broadcast = serve_broadcast
        self._model_sync: ModelSync | None = None  # set once the worker's models are loaded
        self.dropped_oversized = 0  # large messages dropped unread (for tests and metrics)
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
            handler = self._handler_for(msg.body)
            if handler is None:
                await delivery.ack()  # other workers' or future control traffic, or too large to read
                return
            reply = await handler(delivery)
        except ProtocolError as exc:
            reply = ControlError(code="malformed", message=str(exc)[:MAX_ERROR_CHARS]).to_bytes()
        except OverBudget as exc:
            # Cheaper than the work refused: a small publish. The producer's SDK waits for another
            # worker's answer or tries again; a joiner asks again.
            reply = ControlError(code="busy", message=f"this worker is busy: {exc}"[:MAX_ERROR_CHARS]).to_bytes()
        except ProviderError as exc:
            # The TEE would not produce evidence (device busy, kernel error): say so to the
            # producer, whose connect then fails clearly, instead of redelivering forever.
            log.error("could not obtain evidence from the TEE: %s", exc)
            reply = ControlError(code="evidence_unavailable", message=str(exc)[:MAX_ERROR_CHARS]).to_bytes()
        if delivery.settled:
            return
        if reply is not None and msg.reply_to:
            try:
                await self._ctx.broker.publish_reply(msg.reply_to, Message(body=reply,
                                                                           correlation_id=msg.correlation_id))
            except BrokerError as exc:
                log.warning("could not answer a control message: %s", exc)
        await delivery.ack()

    def _handler_for(self, body: bytes) -> ControlHandler | None:
        """The handler for ``body``, decided by its size first and only then by its declared type
        (raises ProtocolError); None for a message this worker ignores."""
        if len(body) > CLEAR_CONTROL_MAX_BYTES:
            if body.startswith(ENVELOPE_PREFIX):
                return self._broadcast_request  # the request path peeks at it with its own limits
            self.dropped_oversized += 1
            log.debug("dropped an unreadable control message of %d bytes", len(body))
            return None
        return self._handlers.get(control_kind(body, max_bytes=CLEAR_CONTROL_MAX_BYTES))

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
