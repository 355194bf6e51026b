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
* Refusals (``not_admitted``) travel in clear and are not authenticated: anyone can send one.
  So a refusal never ends a join early: the joiner keeps listening for the whole window (a
  genuine member's answer may still come), keeps asking for ``REFUSED_ROUNDS`` rounds, and only
  then gives up, naming the refusal. Answers that do not verify or do not parse are ignored.
* While serving (:meth:`Membership.catch_up`): a job sealed to a newer epoch, a verified
  announcement of an epoch we skipped, or a broker reconnect make the worker ask the members
  again -- one request at a time, and on average at most one per
  ``CATCH_UP_MIN_INTERVAL_SECONDS``, since each costs every member a piece of evidence and
  jobs' epochs are not authenticated.
* Answering joins: each request whose evidence verifies is answered once (its nonce is
  remembered), with evidence drawn from the attester's budget.

Every request for keys uses a fresh identity key that is never stored: a recorded answer plus a
later copy of the sealed state must not give back epoch keys that rotation erased.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from attestation.errors import AttestationError
from attestation.providers.errors import ProviderError
from broker_adapters import Message, PoolLock
from broker_adapters.errors import BrokerError, PoolBusy, Unroutable
from protocol import crypto
from protocol.codec import pack, unpack
from protocol.errors import MalformedMessage, ProtocolError
from protocol.handshake import (Challenge, ControlError, JoinRequest, JoinResponse, Statement, control_kind,
                                join_info)

from .attester import Attester
from .budget import BoundedMemory, OverBudget, TokenBucket, noisy
from .context import WorkerContext
from .errors import WorkerStartupError
from .inbox import open_inbox
from .keyring import Keyring, parse_private_key
from .sealed_state import PoolKeys, RetiringKey

log = logging.getLogger("enclaveq.worker")

JOIN_WAIT_SECONDS = 1.5       # how long a joiner listens for members after each request
JOIN_TIMEOUT_SECONDS = 20.0   # how long it keeps asking while another worker holds the founder lock
# Whole rounds (each JOIN_WAIT_SECONDS of listening) that brought refusals and no admission before
# a joiner gives up: enough that a forged refusal never beats a genuine member's answer, which
# comes within one round, while a worker its pool really refuses says so in seconds.
REFUSED_ROUNDS = 3
MAX_SEALED_KEYS = 16 * 1024   # a join hands over the current key plus the few still retiring
# A catch-up asks every member for evidence; what triggers one (a job's clear epoch, a broker
# reconnect) is not authenticated, so they are spaced out: one per interval on average, and a
# flood costs no more. Two may follow each other at once: a genuine catch-up that heard no member
# in time (a slow machine) is retried on the job's next delivery instead of 5 s later, after the
# job has used up its deliveries and been dead-lettered.
CATCH_UP_MIN_INTERVAL_SECONDS = 5.0
CATCH_UP_BURST = 2
# Join requests already answered, by nonce: a replayed genuine request is not answered again.
# A joiner asks about once a window (1.5 s) while it starts; 4096 outlast any request's evidence.
MAX_ANSWERED_JOIN_NONCES = 4096
MAX_REFUSAL_CHARS = 1024  # protocol.handshake.ControlError carries at most 2048 characters


@dataclass(frozen=True)
class JoinRound:
    """What one join request brought: the keys of the first member answer that verified, else
    the last refusal heard (unauthenticated: anyone may have sent it), else nothing."""

    keys: PoolKeys | None = None
    refusal: str | None = None


class Membership:
    def __init__(self, ctx: WorkerContext, *, keyring: Keyring, attester: Attester) -> None:
        self._ctx = ctx
        self._keyring = keyring
        self._attester = attester
        self._pool_lock: PoolLock | None = None  # held by a founder or a lone worker while it lives
        self._catching_up: asyncio.Task[None] | None = None
        self._catch_up_budget: TokenBucket | None = None  # made on first use: the interval is read then
        self.catch_ups = 0  # started, for tests and metrics
        self._answered: BoundedMemory[bytes, bool] = BoundedMemory(MAX_ANSWERED_JOIN_NONCES)
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
        refusal: str | None = None
        refused_rounds = 0
        asked: dict[bytes, X25519PrivateKey] = {}  # every round's nonce -> its one-use identity key
        async with open_inbox(self._ctx.broker, "join") as (address, answers):
            while True:
                heard = await self._request_keys(address, answers, asked)
                if heard.keys is not None:
                    return heard.keys
                refusal = heard.refusal or refusal
                refused_rounds += heard.refusal is not None
                if refusal is not None:
                    # Refused (by a member, or by anyone: refusals are not authenticated). Never
                    # found a rival pool; ask again -- a genuine member may admit us -- for a few
                    # rounds, and only then give up.
                    if refused_rounds >= REFUSED_ROUNDS or loop.time() > give_up:
                        raise WorkerStartupError(f"pool {self._ctx.pool!r} refuses to admit this worker: {refusal} "
                                                 f"(no member admitted it in {refused_rounds} rounds of asking)")
                    await asyncio.sleep(0.2)  # a round that ended early (no one listening) must not spin
                    continue
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
            heard = await self._ask_members_for_keys()
        except WorkerStartupError as exc:
            log.warning("could not catch up with the pool's members (%s); serving with the sealed keys", exc)
            return sealed
        if heard.refusal is not None and heard.keys is None:
            log.warning("pool %r: a member refused to hand over newer keys (%s); serving with the sealed keys",
                        self._ctx.pool, heard.refusal)
        theirs = heard.keys
        return theirs if theirs is not None and self._members_keys_win(theirs, sealed) else sealed

    # -- while serving --------------------------------------------------------------------------
    async def catch_up(self, *, join_in_flight: bool = True) -> bool:
        """Ask the members for the current keys and adopt them if they are newer. One request at
        a time (every caller waits for it), and no more than ``CATCH_UP_BURST`` at once and one
        per ``CATCH_UP_MIN_INTERVAL_SECONDS`` after that: a caller beyond that returns at once,
        with the keys the last catch-up found. True when this call waited for a catch-up, False
        when it was declined (no join policy, over the budget, or -- with ``join_in_flight``
        False -- one was already running: a job need not hold its slot while another job's
        catch-up runs, it goes back to the queue and finds the keys when it returns)."""
        if not self._ctx.identity.can_join:
            return False
        if self._catching_up is not None and not self._catching_up.done() and not join_in_flight:
            return False
        if self._catching_up is None or self._catching_up.done():
            if self._catch_up_budget is None:
                self._catch_up_budget = TokenBucket(rate=1 / CATCH_UP_MIN_INTERVAL_SECONDS, burst=CATCH_UP_BURST,
                                                    clock=self._ctx.monotonic)
            if not self._catch_up_budget.try_take():
                return False
            self.catch_ups += 1
            log.info("pool %r: asking the members for the current keys", self._ctx.pool)
            self._catching_up = asyncio.create_task(self._adopt_members_keys())
        await asyncio.shield(self._catching_up)
        return True

    async def _adopt_members_keys(self) -> None:
        try:
            heard = await self._ask_members_for_keys()
        except (WorkerStartupError, BrokerError) as exc:
            log.warning("could not catch up with the pool's members: %s", exc)
            return
        theirs = heard.keys
        if theirs is None and heard.refusal is not None:
            log.warning("could not catch up with the pool's members: refused (%s)", heard.refusal)
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

    async def _ask_members_for_keys(self) -> JoinRound:
        async with open_inbox(self._ctx.broker, "join") as (address, answers):
            return await self._request_keys(address, answers, {})

    # -- the joiner's side ---------------------------------------------------------------------
    async def _request_keys(self, address: str, answers: asyncio.Queue[bytes],
                            asked: dict[bytes, X25519PrivateKey]) -> JoinRound:
        """Broadcast one join request bound to a fresh one-use identity key and take the first
        member answer that verifies -- to this request or to an earlier one in ``asked`` (a
        member that answered late, under load, is as good as one that answered in time). A
        refusal does not end the wait: it is unauthenticated, and a genuine answer may still come."""
        identity = crypto.generate_private_key()
        identity_public = crypto.public_bytes(identity)
        nonce = os.urandom(32)
        asked[nonce] = identity
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
            return JoinRound()  # nobody consumes the control channel: no live member
        refusal: str | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + JOIN_WAIT_SECONDS
        while (remaining := deadline - loop.time()) > 0:
            try:
                body = await asyncio.wait_for(answers.get(), remaining)
            except TimeoutError:
                break
            try:
                kind = control_kind(body)
                if kind == "control_error":
                    error = ControlError.from_bytes(body)
                    if error.code == "not_admitted":
                        refusal = error.message
                        noisy.warning("pool %r: a refusal to admit this worker (unauthenticated; still listening): %s",
                                    self._ctx.pool, error.message.splitlines()[0] if error.message else "")
                elif kind == "join_response":
                    response = JoinResponse.from_bytes(body)
                    answered = asked.get(response.statement.nonce)
                    if answered is None:
                        raise MalformedMessage("the join response answers another request")
                    return JoinRound(keys=self._accept_join_response(response, response.statement.nonce, answered))
            except (ProtocolError, AttestationError) as exc:
                noisy.warning("ignoring a join response that does not verify: %s", str(exc).splitlines()[0])
        return JoinRound(refusal=refusal)

    def _accept_join_response(self, response: JoinResponse, nonce: bytes, identity: X25519PrivateKey) -> PoolKeys:
        """Mutual attestation, joiner's side: the member must satisfy *our* join policy too, so an
        operator cannot hand us a pool key the operator knows. Raises ProtocolError or
        AttestationError for anything that does not verify or parse."""
        st = response.statement
        if st.nonce != nonce or st.pool != self._ctx.pool or st.suite != crypto.SUITE_ID or st.epoch < 1:
            raise MalformedMessage("the join response answers another request or pool")
        # Bound to the nonce we chose: not a check anyone can make us run at will, so unbudgeted.
        self._attester.verify_peer(response.platform, response.evidence, st, solicited=True)
        identity_public = crypto.public_bytes(identity)
        raw = crypto.hpke_open(response.sealed_keys, identity, join_info(self._ctx.pool, st.epoch, nonce, identity_public))
        # The member's evidence vouches for its statement, not for this sealed blob: anyone can seal
        # to our identity key. The current key must be the one attested; the rest is parsed strictly.
        private, previous = _parse_sealed_keys(raw, st, latest_ms=self._ctx.now_ms()
                                               + self._ctx.config.max_rotation_grace_seconds * 1000)
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
    async def answer_join(self, request: JoinRequest) -> bytes | None:
        """Mutual attestation, member's side: admit the joiner only if its evidence satisfies the
        join policy, then seal the epoch key to the identity key its evidence vouches for."""
        st = request.statement
        if not self._ctx.identity.can_join:
            return ControlError(code="not_admitted", message="this pool's workers cannot admit others yet").to_bytes()
        if st.nonce in self._answered:
            return None  # answered already: a replay, or a redelivery
        if not self._attester.evidence_budget.available():
            # No answer could be made: refuse before spending a verification on it too.
            raise OverBudget("join answers: the evidence budget is spent")
        try:
            if st.pool != self._ctx.pool or st.suite != crypto.SUITE_ID:
                raise MalformedMessage("join request for another pool or suite")
            self._attester.verify_peer(request.platform, request.evidence, st)
        except (AttestationError, ProtocolError) as exc:
            noisy.warning("refused to admit worker %s to pool %r: %s", request.worker_id, self._ctx.pool,
                        str(exc).splitlines()[0])
            # Cut to what a ControlError may carry: a refusal the joiner cannot parse would read as
            # "nobody answered", and a refused worker would go on to found a rival pool.
            return ControlError(code="not_admitted", message=str(exc)[:MAX_REFUSAL_CHARS]).to_bytes()
        keys = self._keyring.keys
        # Retiring keys travel too: a worker joining during a grace period serves the old epoch's jobs.
        payload = pack({"epoch": keys.epoch, "pool_private_key": keys.pool_private_key,
                        "previous": self._keyring.retiring_for_join()})
        sealed = crypto.hpke_seal(payload, st.worker_identity_key,
                                  join_info(self._ctx.pool, keys.epoch, st.nonce, st.worker_identity_key))
        answer = await self._attester.answer_in_thread(Challenge(nonce=st.nonce))
        self._answered.put(st.nonce, True)
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


def _parse_sealed_keys(raw: bytes, st: Statement, *, latest_ms: int) -> tuple[bytes, tuple[RetiringKey, ...]]:
    """(current private key, retiring keys) from an opened join answer; MalformedMessage for
    anything a genuine member never sends. ``latest_ms`` caps every retirement time: our measured
    limit bounds how long a retiring key lives here, whatever the member says."""
    what = "sealed pool keys"
    sealed = unpack(raw, max_bytes=MAX_SEALED_KEYS, what=what)
    if not isinstance(sealed, dict) or type(sealed.get("epoch")) is not int or sealed["epoch"] != st.epoch:
        raise MalformedMessage("sealed pool keys do not match the member's statement")
    private = sealed.get("pool_private_key")
    if crypto.public_bytes(parse_private_key(private, what)) != st.pool_public_key:
        raise MalformedMessage("the sealed pool key is not the key the member attested")
    assert isinstance(private, bytes)  # parse_private_key checked it
    entries = sealed.get("previous", [])
    if not isinstance(entries, list):
        raise MalformedMessage(f"{what}: malformed retiring keys")
    previous: list[RetiringKey] = []
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise MalformedMessage(f"{what}: malformed retiring keys")
        epoch, key, retire_at_ms = entry
        if type(epoch) is not int or type(retire_at_ms) is not int or not 1 <= epoch < st.epoch:
            raise MalformedMessage(f"{what}: a retiring key of an impossible epoch")
        if any(k.epoch == epoch for k in previous):
            raise MalformedMessage(f"{what}: two retiring keys for epoch {epoch}")
        parse_private_key(key, what)
        previous.append(RetiringKey(epoch, key, min(retire_at_ms, latest_ms)))
    return private, tuple(previous)
