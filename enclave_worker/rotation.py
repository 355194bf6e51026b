"""Pool key rotation (P6): drawing the next epoch, announcing it, taking others' announcements,
and erasing retired keys on time.

A rotation is serialised by the pool's rotation lock, so two members never mint rival keys for
one epoch. The new key travels HPKE-sealed to the current epoch's key (exactly the admitted
members hold it) inside an announcement vouched for by the rotator's evidence; each receiver
checks that evidence against its own join policy. The previous key keeps opening jobs for the
grace period -- capped by the measured ``max_rotation_grace_seconds``, whatever anyone asks --
and is then erased from memory, the session cache and sealed state (by the keyring).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from attestation.errors import AttestationError
from attestation.providers.errors import ProviderError
from broker_adapters import Message, PoolLock
from broker_adapters.errors import BrokerError, PoolBusy
from protocol import bodies, crypto
from protocol.errors import MalformedMessage, ProtocolError
from protocol.handshake import EpochAnnounce, rotation_nonce

from .attester import Attester
from .budget import BoundedMemory, OverBudget, noisy
from .context import WorkerContext
from .errors import JobRejected
from .keyring import Keyring

log = logging.getLogger("enclaveq.worker")

ROTATION_LOCK_SECONDS = 10.0   # how long a rotation waits for another member's rotation to finish
ROTATION_SETTLE_SECONDS = 0.5  # the rotator keeps the lock this long so members see its announcement first
DEFAULT_ROTATION_GRACE_SECONDS = 300
# Any producer the pool serves may ask for a rotation (it can send jobs anyway); this bounds how
# often such requests can force every other producer to re-attest.
MIN_REQUESTED_ROTATION_SECONDS = 10.0
# Announcements already checked, by a digest of their whole content, with the verdict: a replayed
# announcement (genuine or forged) costs a dict lookup, never a second evidence check. A genuine
# one is useful for one rotation; 64 covers far more rotations than a grace period can hold.
MAX_REMEMBERED_ANNOUNCEMENTS = 64


class Rotation:
    def __init__(self, ctx: WorkerContext, *, keyring: Keyring, attester: Attester,
                 catch_up: Callable[[], Coroutine[Any, Any, object]], every: float | None = None,
                 grace: float = DEFAULT_ROTATION_GRACE_SECONDS) -> None:
        self._ctx = ctx
        self._keyring = keyring
        self._attester = attester
        self._catch_up = catch_up  # when an announcement skips an epoch we never saw
        self._every = every
        self._grace = grace
        self._tasks: list[asyncio.Task[None]] = []  # the eraser and the scheduler: two at most
        # At most one catch-up started by announcements at a time (Membership rate-limits them too).
        self._catching_up: asyncio.Task[object] | None = None
        self._announcements: BoundedMemory[bytes, bool] = BoundedMemory(MAX_REMEMBERED_ANNOUNCEMENTS)

    def start(self) -> None:
        """Erase retiring keys when due; with ``every``, rotate on schedule too."""
        self._tasks.append(asyncio.create_task(self._erase_when_due()))
        if self._every:
            self._tasks.append(asyncio.create_task(self._rotate_periodically(self._every)))

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if self._catching_up is not None:
            self._catching_up.cancel()
            self._catching_up = None

    # -- rotating ------------------------------------------------------------------------------
    async def rotate_on_request(self, grace_seconds: int, *, from_epoch: int | None = None) -> tuple[int, int]:
        """A producer's ``pool_rotate``: rotate away from ``from_epoch`` (the epoch the request
        was sealed to). If the pool has already moved on -- the same request replayed to another
        member, or another producer's rotation -- answer with the current epoch and when the
        previous one retires, without rotating again. Refused when too soon after the last
        rotation or when the grace period exceeds the measured limit.

        Everything that depends on the pool's state is checked under the rotation lock: checked
        before it, every member handed the same request would pass and the pool would rotate N times."""
        if grace_seconds > self._ctx.config.max_rotation_grace_seconds:
            raise JobRejected(f"a grace period of {grace_seconds}s exceeds this pool's measured limit of "
                              f"{self._ctx.config.max_rotation_grace_seconds}s", bodies.ErrorCode.ROTATION_REFUSED)
        # Checked before the lock as well: both outcomes only grow truer as the pool moves on, so
        # a flood of requests is answered without a round trip to the broker's lock.
        if (answer := self._answer_without_rotating(from_epoch)) is not None:
            return answer
        async with self._rotation_lock():
            if (answer := self._answer_without_rotating(from_epoch)) is not None:
                return answer
            return await self._rotate_locked(grace_seconds)

    def _answer_without_rotating(self, from_epoch: int | None) -> tuple[int, int] | None:
        """The answer to a rotation request that must not rotate (the pool has moved on from
        ``from_epoch``), JobRejected if it is too soon, None if the pool may rotate now."""
        keys = self._keyring.keys
        if from_epoch is not None and keys.epoch != from_epoch:
            return keys.epoch, self._retire_at_ms(keys.epoch - 1)
        age = self._ctx.clock() - keys.created_ms / 1000
        if keys.epoch > 1 and age < MIN_REQUESTED_ROTATION_SECONDS:
            raise JobRejected(f"the pool key was rotated {age:.1f}s ago; rotations are at least "
                              f"{MIN_REQUESTED_ROTATION_SECONDS:g}s apart", bodies.ErrorCode.ROTATION_REFUSED)
        return None

    async def rotate(self, grace_seconds: float, *, only_from_epoch: int | None = None) -> tuple[int, int]:
        """Draw epoch N+1, make it current here and announce it to every member; epoch N keeps
        opening jobs for ``grace_seconds``. Returns (epoch, retire_at_ms). ``only_from_epoch``
        (scheduled rotation) skips it if another member rotated while this one waited."""
        async with self._rotation_lock():
            current = self._keyring.epoch
            if only_from_epoch is not None and current != only_from_epoch:
                return current, 0
            return await self._rotate_locked(grace_seconds)

    def _retire_at_ms(self, epoch: int) -> int:
        """When the retiring key of ``epoch`` is erased here (0: it is not held any more)."""
        return next((k.retire_at_ms for k in self._keyring.keys.previous if k.epoch == epoch), 0)

    async def _rotate_locked(self, grace_seconds: float) -> tuple[int, int]:
        current = self._keyring.epoch
        new_private = crypto.private_bytes(crypto.generate_private_key())
        retire_at_ms = self._ctx.now_ms() + int(grace_seconds * 1000)
        sealed, nonce = self._keyring.seal_next(new_private, self._ctx.pool, retire_at_ms)
        epoch = current + 1
        statement = self._attester.statement(
            nonce, epoch=epoch, pool_public_key=crypto.public_bytes(crypto.load_private_key(new_private)))
        evidence = await asyncio.to_thread(self._attester.evidence, statement)
        announce = EpochAnnounce(platform=self._attester.platform, evidence=evidence, statement=statement,
                                 previous_epoch=current, retire_at_ms=retire_at_ms, sealed_key=sealed,
                                 worker_id=self._ctx.worker_id)
        self._keyring.install(epoch, new_private, retire_at_ms)
        log.info("rotated pool %r to epoch %d; epoch %d is erased in %gs", self._ctx.pool, epoch, current,
                 grace_seconds)
        if self._ctx.identity.can_join:
            # A member that misses this (broker hiccup) catches up when it first sees a job
            # sealed to the new epoch: it asks for the keys with a join request.
            await self._ctx.broker.publish_control(self._ctx.pool, Message(body=announce.to_bytes()))
            await asyncio.sleep(ROTATION_SETTLE_SECONDS)
        return epoch, retire_at_ms

    @contextlib.asynccontextmanager
    async def _rotation_lock(self) -> AsyncIterator[None]:
        lock = await self._take_rotation_lock()
        try:
            yield
        finally:
            await lock.release()

    async def _take_rotation_lock(self) -> PoolLock:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + ROTATION_LOCK_SECONDS
        while True:
            try:
                return await self._ctx.broker.acquire_pool_lock(self._ctx.pool, purpose="rotation")
            except PoolBusy:
                if loop.time() > give_up:
                    raise JobRejected("another member of the pool is rotating its key; try again",
                                      bodies.ErrorCode.ROTATION_REFUSED) from None
                await asyncio.sleep(0.2)

    async def _rotate_periodically(self, every: float) -> None:
        """``--rotate-every``: rotate when the current epoch is older than the interval. Every member
        with the option runs this; the rotation lock and ``only_from_epoch`` make one of them win."""
        while True:
            keys = self._keyring.keys
            wait = keys.created_ms / 1000 + every - self._ctx.clock()
            if wait > 0:
                await asyncio.sleep(min(wait, 5.0))
                continue
            await asyncio.sleep(random.uniform(0, min(5.0, every / 10)))
            if self._keyring.epoch != keys.epoch:
                continue
            try:
                await self.rotate(self._grace, only_from_epoch=keys.epoch)
            except (BrokerError, JobRejected, ProviderError) as exc:
                log.warning("automatic rotation of pool %r failed: %s", self._ctx.pool, exc)
                await asyncio.sleep(5.0)

    # -- others' rotations -----------------------------------------------------------------------
    async def on_announce(self, announce: EpochAnnounce) -> None:
        """Take another member's new epoch key, if its evidence satisfies our join policy.

        Anyone can publish an announcement, so nothing is done for one before its evidence has
        verified: a forged one costs one (budgeted) check, a replay of any one a dict lookup.
        A verified announcement that skips epochs we never saw starts a catch-up -- at most one
        at a time, and Membership spaces them out -- instead of one task per message."""
        if not self._ctx.identity.can_join or announce.worker_id == self._ctx.worker_id:
            return
        current = self._keyring.epoch
        if announce.statement.epoch <= current:
            return  # old news, or a replay of it
        digest = hashlib.sha256(announce.to_bytes()).digest()
        verdict = self._announcements.get(digest)
        if verdict is None:
            try:
                self._check_announcement(announce)
                verdict = True
            except OverBudget:
                log.debug("pool %r: an epoch announcement left unchecked (too many to check)", self._ctx.pool)
                return
            except (AttestationError, ProtocolError) as exc:
                noisy.warning("ignoring an epoch announcement that does not verify: %s", str(exc).splitlines()[0])
                verdict = False
            self._announcements.put(digest, verdict)
        if not verdict:
            return
        if announce.previous_epoch != current:
            self._start_catch_up(announce.statement.epoch, current)
            return
        try:
            private = self._keyring.open_announce(announce, self._ctx.pool)
        except ProtocolError as exc:
            noisy.warning("ignoring an epoch announcement whose key does not open: %s", str(exc).splitlines()[0])
            self._announcements.put(digest, False)
            return
        # Our measured limit bounds how long any old key lives here, whatever the announcer's clock says.
        retire_at_ms = min(announce.retire_at_ms, self._ctx.now_ms() + self._ctx.config.max_rotation_grace_seconds * 1000)
        self._keyring.install(announce.statement.epoch, private, retire_at_ms)
        log.info("pool %r rotated to epoch %d by member %s", self._ctx.pool, self._keyring.epoch, announce.worker_id)

    def _check_announcement(self, announce: EpochAnnounce) -> None:
        """The cheap checks first (pool, suite, the nonce binding the sealed key), then the
        announcer's evidence against our join policy -- exactly like a member handing us keys."""
        st = announce.statement
        if st.pool != self._ctx.pool or st.suite != crypto.SUITE_ID:
            raise MalformedMessage("epoch announcement for another pool or suite")
        if st.nonce != rotation_nonce(self._ctx.pool, st.epoch, announce.previous_epoch, announce.retire_at_ms,
                                      announce.sealed_key):
            raise MalformedMessage("epoch announcement: the evidence does not vouch for this sealed key")
        self._attester.verify_peer(announce.platform, announce.evidence, st)

    def _start_catch_up(self, announced: int, current: int) -> None:
        if self._catching_up is not None and not self._catching_up.done():
            return
        log.debug("pool %r announced epoch %d while this worker is at %d: catching up", self._ctx.pool,
                  announced, current)
        self._catching_up = asyncio.create_task(self._catch_up())

    # -- erasure -----------------------------------------------------------------------------------
    async def _erase_when_due(self) -> None:
        """Erase each retiring key at its retirement time (P6)."""
        changed = self._keyring.changed
        while True:
            changed.clear()
            due = self._keyring.next_retirement_ms()
            timeout = None if due is None else max(0.05, (due - self._ctx.now_ms()) / 1000)
            try:
                await asyncio.wait_for(changed.wait(), timeout)
            except TimeoutError:
                self._keyring.erase_retired()
