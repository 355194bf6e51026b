"""Pool membership: how a worker gets the pool's keys, and how it hands them to others.

* At start (:meth:`Membership.obtain_keys`): a worker without a join policy holds the pool alone
  (it keeps the pool lock while it lives); one with sealed keys asks the live members for newer
  ones (it may have missed rotations); one without keys joins a live member or founds the pool.
* Joining is *mutual* attestation: the member admits the joiner only if its evidence satisfies
  the member's join policy, and the joiner takes the key only if the member's evidence satisfies
  its own -- so an operator can neither get a key nor hand a worker one it knows.
* Founding is serialised by the pool lock: a worker that hears no member takes the lock, asks
  once more (a rival founder may have just started answering) and only then founds; it keeps the
  lock while it lives. A worker that a member refuses never founds.
* While serving (:meth:`Membership.catch_up`): a job sealed to a newer epoch, a gap in the
  announced epochs or a broker reconnect make the worker ask the members again.

Every request for keys uses a fresh identity key that is never stored: a recorded answer plus a
later copy of the sealed state must not give back epoch keys that rotation erased.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from attestation.errors import AttestationError
from attestation.providers.errors import ProviderError
from attestation.verify import verify_evidence
from broker_adapters import Message, PoolLock
from broker_adapters.errors import BrokerError, PoolBusy, Unroutable
from protocol import crypto
from protocol.codec import pack, unpack
from protocol.errors import MalformedMessage, ProtocolError
from protocol.handshake import (Challenge, ControlError, JoinRequest, JoinResponse, Statement, control_kind,
                                join_info)

from .context import WorkerContext
from .attester import Attester
from .errors import WorkerStartupError
from .inbox import open_inbox
from .keyring import Keyring
from .sealed_state import PoolKeys, RetiringKey

log = logging.getLogger("enclaveq.worker")

JOIN_WAIT_SECONDS = 1.5       # how long a joiner listens for members after each request
JOIN_TIMEOUT_SECONDS = 20.0   # how long it keeps asking while another worker holds the founder lock
MAX_SEALED_KEYS = 16 * 1024   # a join hands over the current key plus the few still retiring


class Membership:
    def __init__(self, ctx: WorkerContext, *, keyring: Keyring, attester: Attester) -> None:
        self._ctx = ctx
        self._keyring = keyring
        self._attester = attester
        self._pool_lock: PoolLock | None = None  # held by a founder or a lone worker while it lives
        self._catching_up: asyncio.Task[None] | None = None
        # The member whose join answer we took: it is the one asked to send us the models.
        self.admitted_by = ""

    # -- at start -------------------------------------------------------------------------------
    async def obtain_keys(self, sealed: PoolKeys | None) -> PoolKeys:
        """The keys to serve with: see the module docstring for the three cases."""
        if not self._ctx.identity.can_join:
            return await self._hold_pool_alone(sealed)
        if sealed is None:
            return await self._join_or_found()
        return await self._newest_keys_at_restart(sealed)

    async def _hold_pool_alone(self, sealed: PoolKeys | None) -> PoolKeys:
        """Without a join policy a pool has one worker: it holds the pool lock for its lifetime."""
        try:
            self._pool_lock = await self._ctx.broker.acquire_pool_lock(self._ctx.pool)
        except PoolBusy:
            raise WorkerStartupError(
                f"pool {self._ctx.pool!r} already has a worker, and joining a pool needs a join policy, which "
                "this platform does not have yet; start this worker on another pool or stop the other one."
            ) from None
        return sealed or self._new_pool_keys()

    def _new_pool_keys(self) -> PoolKeys:
        log.info("founded pool %r: a new epoch-1 pool key", self._ctx.pool)
        return PoolKeys(epoch=1, pool_private_key=crypto.private_bytes(crypto.generate_private_key()),
                        identity_private_key=crypto.private_bytes(crypto.generate_private_key()),
                        created_ms=self._ctx.now_ms())

    async def _join_or_found(self) -> PoolKeys:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + JOIN_TIMEOUT_SECONDS
        async with open_inbox(self._ctx.broker, "join") as (address, answers):
            while True:
                keys = await self._request_keys(crypto.generate_private_key(), address, answers)
                if keys is not None:
                    return keys
                if self._pool_lock is not None:
                    return self._new_pool_keys()
                try:
                    self._pool_lock = await self._ctx.broker.acquire_pool_lock(self._ctx.pool)
                except PoolBusy:
                    # Someone holds the founder lock: a founder is starting or alive; ask again.
                    if loop.time() > give_up:
                        raise WorkerStartupError(
                            f"no member of pool {self._ctx.pool!r} answered the join request within "
                            f"{JOIN_TIMEOUT_SECONDS:g}s although the pool has a founder") from None
                    await asyncio.sleep(0.2)

    async def _newest_keys_at_restart(self, sealed: PoolKeys) -> PoolKeys:
        """A restarted member may have missed rotations while it was down: a live member hands it
        the current keys (mutual attestation again); none answering is fine."""
        try:
            theirs = await self._ask_members_for_keys()
        except WorkerStartupError as exc:
            log.warning("could not catch up with the pool's members (%s); serving with the sealed keys", exc)
            return sealed
        return theirs if theirs is not None and self._members_keys_win(theirs, sealed) else sealed

    # -- while serving --------------------------------------------------------------------------
    async def catch_up(self) -> None:
        """Ask the members for the current keys and adopt them if they are newer; one request at a
        time, every caller waits for it."""
        if not self._ctx.identity.can_join:
            return
        if self._catching_up is None or self._catching_up.done():
            self._catching_up = asyncio.create_task(self._adopt_members_keys())
        await asyncio.shield(self._catching_up)

    async def _adopt_members_keys(self) -> None:
        try:
            theirs = await self._ask_members_for_keys()
        except (WorkerStartupError, BrokerError) as exc:
            log.warning("could not catch up with the pool's members: %s", exc)
            return
        if theirs is not None and self._members_keys_win(theirs, self._keyring.keys):
            self._keyring.adopt(theirs)
            log.info("caught up with pool %r: epoch %d", self._ctx.pool, theirs.epoch)

    def _members_keys_win(self, theirs: PoolKeys, ours: PoolKeys) -> bool:
        """Whether keys a live member handed over replace ours: a newer epoch (we missed a
        rotation), or another key for the same epoch -- we founded the pool while cut off from
        its members (a network partition); producers attest the live members, so theirs win."""
        if theirs.epoch < ours.epoch:
            return False
        if theirs.epoch > ours.epoch:
            log.info("pool %r rotated while this worker was away: now at epoch %d", self._ctx.pool, theirs.epoch)
            return True
        if theirs.pool_private_key != ours.pool_private_key:
            log.warning("pool %r: the live members hold another epoch-%d key than this worker "
                        "(founded during a partition?); adopting the members' key", self._ctx.pool, ours.epoch)
            return True
        return False

    async def _ask_members_for_keys(self) -> PoolKeys | None:
        async with open_inbox(self._ctx.broker, "join") as (address, answers):
            return await self._request_keys(crypto.generate_private_key(), address, answers)

    # -- the joiner's side ---------------------------------------------------------------------
    async def _request_keys(self, identity: X25519PrivateKey, address: str,
                            answers: asyncio.Queue[bytes]) -> PoolKeys | None:
        """Broadcast one join request bound to ``identity`` (a one-use key) and take the first
        member answer that verifies; None when no member answers in time."""
        identity_public = crypto.public_bytes(identity)
        nonce = os.urandom(32)
        statement = Statement(pool=self._ctx.pool, epoch=0, suite=crypto.SUITE_ID, pool_public_key=bytes(32),
                              worker_identity_key=identity_public, nonce=nonce,
                              config_digest=self._ctx.identity.config_digest)
        try:
            evidence = await asyncio.to_thread(self._ctx.identity.provider.evidence, statement.report_data())
        except ProviderError as exc:
            raise WorkerStartupError(f"the TEE gave no evidence to join pool {self._ctx.pool!r} with: {exc}") from None
        request = JoinRequest(platform=self._ctx.identity.provider.platform, evidence=evidence, statement=statement,
                              worker_id=self._ctx.worker_id)
        try:
            await self._ctx.broker.publish_control(self._ctx.pool, Message(body=request.to_bytes(), reply_to=address,
                                                                   correlation_id=f"join-{nonce.hex()}"))
        except Unroutable:
            return None  # nobody consumes the control channel: no live member
        loop = asyncio.get_running_loop()
        deadline = loop.time() + JOIN_WAIT_SECONDS
        while (remaining := deadline - loop.time()) > 0:
            try:
                body = await asyncio.wait_for(answers.get(), remaining)
            except TimeoutError:
                return None
            try:
                kind = control_kind(body)
                if kind == "control_error":
                    error = ControlError.from_bytes(body)
                    if error.code == "not_admitted":
                        raise WorkerStartupError(f"pool {self._ctx.pool!r} refuses to admit this worker: {error.message}")
                    continue
                if kind == "join_response":
                    return self._accept_join_response(JoinResponse.from_bytes(body), nonce, identity)
            except (ProtocolError, AttestationError) as exc:
                log.warning("ignoring a join response that does not verify: %s", exc)
        return None

    def _accept_join_response(self, response: JoinResponse, nonce: bytes, identity: X25519PrivateKey) -> PoolKeys:
        """Mutual attestation, joiner's side: the member must satisfy *our* join policy too, so an
        operator cannot hand us a pool key the operator knows."""
        st = response.statement
        if st.nonce != nonce or st.pool != self._ctx.pool or st.suite != crypto.SUITE_ID:
            raise MalformedMessage("the join response answers another request or pool")
        verify_evidence(response.platform, response.evidence, self._ctx.identity.join_policy,
                        expected_report_data=st.report_data(), now=datetime.fromtimestamp(self._ctx.clock(), UTC),
                        **self._ctx.identity.join_verify_options)
        identity_public = crypto.public_bytes(identity)
        raw = crypto.hpke_open(response.sealed_keys, identity, join_info(self._ctx.pool, st.epoch, nonce, identity_public))
        sealed = unpack(raw, max_bytes=MAX_SEALED_KEYS, what="sealed pool keys")
        if not isinstance(sealed, dict) or sealed.get("epoch") != st.epoch:
            raise MalformedMessage("sealed pool keys do not match the member's statement")
        private = sealed.get("pool_private_key")
        if not isinstance(private, bytes) or crypto.public_bytes(crypto.load_private_key(private)) != st.pool_public_key:
            raise MalformedMessage("the sealed pool key is not the key the member attested")
        # Our measured cap bounds how long a retiring key lives here, whatever the member says.
        latest_ms = self._ctx.now_ms() + self._ctx.config.max_rotation_grace_seconds * 1000
        try:
            previous = tuple(RetiringKey(e, bytes(k), min(r, latest_ms)) for e, k, r in sealed.get("previous", [])
                             if type(e) is int and type(r) is int and e < st.epoch)
        except (TypeError, ValueError):
            raise MalformedMessage("sealed pool keys: malformed retiring keys") from None
        # The identity key this response was sealed to is dropped here and never sealed to disk:
        # otherwise a recorded join response plus a later copy of the sealed state would give
        # back epoch keys that rotation has erased (P6). The worker attests a fresh identity key.
        keys = PoolKeys(epoch=st.epoch, pool_private_key=private,
                        identity_private_key=crypto.private_bytes(crypto.generate_private_key()),
                        created_ms=self._ctx.now_ms(), previous=previous).without_retired(self._ctx.now_ms())
        self.admitted_by = response.worker_id
        log.info("joined pool %r (epoch %d) from member %s after mutual attestation", self._ctx.pool, st.epoch,
                 response.worker_id)
        return keys

    # -- the member's side ---------------------------------------------------------------------
    async def answer_join(self, request: JoinRequest) -> bytes:
        """Mutual attestation, member's side: admit the joiner only if its evidence satisfies the
        join policy, then seal the epoch key to the identity key its evidence vouches for."""
        st = request.statement
        if not self._ctx.identity.can_join:
            return ControlError(code="not_admitted", message="this pool's workers cannot admit others yet").to_bytes()
        try:
            if st.pool != self._ctx.pool or st.suite != crypto.SUITE_ID:
                raise MalformedMessage("join request for another pool or suite")
            verify_evidence(request.platform, request.evidence, self._ctx.identity.join_policy,
                            expected_report_data=st.report_data(), now=datetime.fromtimestamp(self._ctx.clock(), UTC),
                            **self._ctx.identity.join_verify_options)
        except (AttestationError, ProtocolError) as exc:
            log.warning("refused to admit worker %s to pool %r: %s", request.worker_id, self._ctx.pool,
                        str(exc).splitlines()[0])
            return ControlError(code="not_admitted", message=str(exc)).to_bytes()
        keys = self._keyring.keys
        # Retiring keys travel too: a worker joining during a grace period serves the old epoch's jobs.
        payload = pack({"epoch": keys.epoch, "pool_private_key": keys.pool_private_key,
                        "previous": self._keyring.retiring_for_join()})
        sealed = crypto.hpke_seal(payload, st.worker_identity_key,
                                  join_info(self._ctx.pool, keys.epoch, st.nonce, st.worker_identity_key))
        answer = await self._attester.answer_in_thread(Challenge(nonce=st.nonce))
        log.info("admitted worker %s to pool %r", request.worker_id, self._ctx.pool)
        return JoinResponse(platform=answer.platform, evidence=answer.evidence, statement=answer.statement,
                            sealed_keys=sealed, worker_id=self._ctx.worker_id).to_bytes()

    async def release(self) -> None:
        """Give up the pool lock (at stop): another worker may found or serve the pool alone."""
        if self._catching_up is not None:
            self._catching_up.cancel()
        if self._pool_lock is not None:
            lock, self._pool_lock = self._pool_lock, None
            try:
                await lock.release()
            except Exception:  # best effort at stop: the broker frees it with our connection anyway
                pass
