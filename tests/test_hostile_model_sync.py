"""Model sync against a hostile broker (issue 9, items 5 and 2): only a member's fresh request
is answered, once, within a budget; only a member can write a sync's messages; a worker whose
state directory was put back from an older copy catches up with a live member and says so."""

from __future__ import annotations

import asyncio
import re
import dataclasses
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator

import msgpack
import numpy as np
import pytest

from broker_adapters import Delivery, Message, open_broker
from broker_adapters.base import BrokerAdapter
from enclave_worker import model_sync
from enclave_worker.model_sync import (MAX_QUEUED_SYNCS, MAX_REMEMBERED_REQUESTS, REQUEST_FRESHNESS_MS,
                                       SyncAdmission, SyncBudget, SyncCollector, SyncRefused, seal_end, seal_model)
from enclave_worker.ownership import CatalogVersion
from enclave_worker.worker import Worker
from producer_sdk import AsyncClient
from producer_sdk.errors import NotAllowed, UnknownModel
from protocol import crypto
from protocol.codec import pack
from protocol.errors import DecryptionFailed
from protocol.handshake import (ModelSyncChunk, ModelSyncRequest, control_kind, member_mac_key, model_sync_info,
                                model_sync_key)
from protocol.ownership import ModelManifest, generate_signing_key, public_key_bytes

from .support import TIMEOUT, mlp_model, running_worker, wait_until

X = {"x": np.ones((2, 4), np.float32), "bias": np.zeros(3, np.float32)}
# The address of reply queue NAME: enclaveq.reply.NAME on AMQP, enclaveq/reply/NAME on MQTT.
REPLY_ADDRESS = re.compile(r"enclaveq[./]reply[./](?P<name>.+)")


# -- helpers: an attacker's view of the broker, and counting what a member does --------------------
class ReplyQueue:
    """A reply queue the attacker reads: every body that arrives, by message kind."""

    def __init__(self, broker: BrokerAdapter, name: str) -> None:
        self.broker, self.name = broker, name
        self.address = ""
        self.bodies: list[bytes] = []

    async def __aenter__(self) -> ReplyQueue:
        self.address = await self.broker.declare_reply_queue(self.name)

        async def take(delivery: Delivery) -> None:
            self.bodies.append(delivery.message.body)
            await delivery.ack()
        self._sub = await self.broker.consume_replies(self.name, take)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._sub.cancel()
        await self.broker.delete_reply_queue(self.name)

    def kinds(self) -> list[str]:
        return [control_kind(b) for b in self.bodies]

    def chunks(self) -> int:
        return self.kinds().count("model_sync_chunk")


class CountingMember:
    """Counts, on a live member, the model reads and the sync requests it finished handling."""

    def __init__(self, worker: Worker) -> None:
        self.reads = 0
        self.handled = 0
        sync = worker._model_sync
        library = worker.models
        real_read, real_send = library.read_sealed, sync.send

        def read_sealed(model_id: str) -> bytes:
            self.reads += 1
            return real_read(model_id)

        async def send(request, reply_to):
            try:
                await real_send(request, reply_to)
            finally:
                self.handled += 1
        library.read_sealed = read_sealed
        sync.send = send


@pytest.fixture
async def attacker(memory_url: str) -> AsyncIterator[BrokerAdapter]:
    """A broker client of the attacker's: it publishes, reads and declares what it likes."""
    async with open_broker(memory_url) as broker:
        yield broker


@pytest.fixture
async def broker_attacker(broker_url: str) -> AsyncIterator[BrokerAdapter]:
    """The same, on the in-process broker and on RabbitMQ."""
    async with open_broker(broker_url) as broker:
        yield broker


def genuine_request(member: Worker, reply_to: str, *, nonce: bytes | None = None, have: tuple[str, ...] = (),
                    issued_at_ms: int | None = None) -> ModelSyncRequest:
    """A request a pool member makes (built with a member's epoch key)."""
    epoch = member.keyring.epoch
    key = member_mac_key(crypto.private_bytes(member.keyring.current_private), member.pool, epoch)
    return ModelSyncRequest.create(key, pool=member.pool, epoch=epoch, nonce=nonce or os.urandom(32),
                                   worker_id="restarted-member", have=have, source="",
                                   issued_at_ms=int(time.time() * 1000) if issued_at_ms is None else issued_at_ms,
                                   reply_to=reply_to)


# -- item 5: who is answered, how often, within what budget ------------------------------------------
async def test_forged_sync_requests_make_a_member_read_and_publish_nothing(tee, broker_url, pool, broker_attacker,
                                                                          monkeypatch):
    parsed = []
    real_parse = ModelSyncRequest.from_bytes.__func__

    def counting_parse(cls, data):
        try:
            return real_parse(cls, data)
        finally:
            parsed.append(data)
    monkeypatch.setattr(ModelSyncRequest, "from_bytes", classmethod(counting_parse))
    async with running_worker(tee, broker_url, pool) as member:
        async with AsyncClient(broker_url, pool, tee.policy()) as client:
            await client.upload_model(mlp_model())
        counted = CountingMember(member)
        async with ReplyQueue(broker_attacker, "loot") as loot:
            epoch, now_ms = member.keyring.epoch, int(time.time() * 1000)
            # The best a non-member can do: well-formed requests with a MAC it made up, or one
            # under a key derived from what it knows (the attested public pool key).
            public_key = member_mac_key(member.pool_public_key, pool, epoch)
            forged = [ModelSyncRequest.create(public_key, pool=pool, epoch=epoch, nonce=os.urandom(32),
                                              worker_id="mallory", have=(), source="", issued_at_ms=now_ms,
                                              reply_to=loot.address)]
            forged += [ModelSyncRequest(have=(), worker_id="mallory", nonce=os.urandom(32), epoch=epoch,
                                        issued_at_ms=now_ms, mac=os.urandom(32)) for _ in range(49)]
            bodies = [r.to_bytes() for r in forged]
            # And today's unauthenticated request, word for word.
            bodies.append(pack({"v": 1, "t": "model_sync_request", "have": [], "worker": "mallory",
                                "nonce": os.urandom(32), "source": ""}))
            for body in bodies:
                await broker_attacker.publish_control(pool, Message(body=body, reply_to=loot.address))
            await wait_until(lambda: len(parsed) == len(bodies) and counted.handled == len(forged),
                             "the member handled every forged request", timeout=TIMEOUT)
            assert counted.reads == 0
            assert loot.chunks() == 0
            assert member._model_sync.refused["unauthenticated"] == len(forged)
            assert member._model_sync.syncs_sent == 0


async def test_a_replayed_genuine_request_is_served_once_however_often_it_is_replayed(tee, broker_url, pool,
                                                                                     broker_attacker, tmp_path):
    recorded: list[Message] = []

    async def record(delivery: Delivery) -> None:
        if control_kind(delivery.message.body) == "model_sync_request":
            recorded.append(delivery.message)
        await delivery.ack()

    async with running_worker(tee, broker_url, pool) as member:
        async with AsyncClient(broker_url, pool, tee.policy()) as client:
            model_id = await client.upload_model(mlp_model())
        counted = CountingMember(member)
        spy = await broker_attacker.consume_control(pool, record)
        # A member starts and catches up: its genuine request is served (and recorded on the way).
        async with running_worker(tee, broker_url, pool, state_dir=tmp_path / "b") as restarted:
            assert restarted.models.has(model_id)
        await spy.cancel()
        assert len(recorded) == 1 and counted.reads == 1 and member._model_sync.syncs_sent == 1
        request = recorded[0]
        # The attacker takes the requester's queue name (it was deleted after the sync) and replays.
        async with ReplyQueue(broker_attacker, REPLY_ADDRESS.fullmatch(request.reply_to)["name"]) as loot:
            for _ in range(100):
                await broker_attacker.publish_control(pool, Message(body=request.body, reply_to=request.reply_to))
            await wait_until(lambda: counted.handled == 101, "the member handled every replay", timeout=TIMEOUT)
            assert counted.reads == 1 and loot.chunks() == 0
            assert member._model_sync.syncs_sent == 1
            assert member._model_sync.refused["replayed"] == 100


async def test_a_burst_of_genuine_requests_is_sent_one_at_a_time_and_the_excess_dropped(tee, memory_url, pool,
                                                                                      attacker):
    async with running_worker(tee, memory_url, pool) as member:
        async with AsyncClient(memory_url, pool, tee.policy()) as client:
            await client.upload_model(mlp_model())
        counted = CountingMember(member)
        gate, reading, most = threading.Event(), [0], [0]
        counting_read = member.models.read_sealed

        def held_read(model_id: str) -> bytes:  # holds the first sync until every request arrived
            reading[0] += 1
            most[0] = max(most[0], reading[0])
            try:
                gate.wait(TIMEOUT)
                return counting_read(model_id)
            finally:
                reading[0] -= 1
        member.models.read_sealed = held_read
        burst = 12
        async with ReplyQueue(attacker, "burst") as inbox:
            try:
                for _ in range(burst):
                    await attacker.publish_control(pool, Message(body=genuine_request(member, inbox.address)
                                                                 .to_bytes(), reply_to=inbox.address))
                await wait_until(lambda: member._model_sync.refused["busy"] == burst - MAX_QUEUED_SYNCS,
                                 "the requests beyond the queue are dropped", timeout=TIMEOUT)
            finally:
                gate.set()
            await wait_until(lambda: counted.handled == burst, "every request handled", timeout=TIMEOUT)
            assert member._model_sync.syncs_sent == MAX_QUEUED_SYNCS
            assert counted.reads == MAX_QUEUED_SYNCS and most[0] == 1  # never two syncs at once


async def test_genuine_requests_beyond_the_byte_budget_are_dropped(tee, memory_url, pool, attacker, monkeypatch):
    monkeypatch.setattr(model_sync, "SYNC_BUDGET_COPIES", 1)  # a budget of one library per window
    monkeypatch.setattr(model_sync, "SYNC_BUDGET_FLOOR_BYTES", 1)
    async with running_worker(tee, memory_url, pool) as member:
        async with AsyncClient(memory_url, pool, tee.policy()) as client:
            await client.upload_model(mlp_model())
        counted = CountingMember(member)
        async with ReplyQueue(attacker, "budget") as inbox:
            for n in range(3):
                await attacker.publish_control(pool, Message(body=genuine_request(member, inbox.address)
                                                             .to_bytes(), reply_to=inbox.address))
                await wait_until(lambda n=n: counted.handled == n + 1, "the request handled", timeout=TIMEOUT)
            assert member._model_sync.syncs_sent == 1 and counted.reads == 1
            assert member._model_sync.refused["budget"] == 2


class OneEpoch:
    """A keyring holding epochs 4 (current) and 3 (retiring)."""

    def __init__(self) -> None:
        self.keys = {4: crypto.generate_private_key(), 3: crypto.generate_private_key()}

    def private_for(self, epoch: int):
        from enclave_worker.keyring import EpochAhead, EpochRetired
        if epoch in self.keys:
            return self.keys[epoch]
        raise EpochAhead(epoch) if epoch > 4 else EpochRetired(epoch)

    def request(self, epoch: int, reply_to: str = "r", issued_at_ms: int = 1_000_000, **kw) -> ModelSyncRequest:
        key = member_mac_key(crypto.private_bytes(self.keys[epoch]), "p", epoch)
        return ModelSyncRequest.create(key, pool="p", epoch=epoch, nonce=kw.pop("nonce", os.urandom(32)),
                                       worker_id="w", have=("ab" * 32,), source="", issued_at_ms=issued_at_ms,
                                       reply_to=reply_to)


def test_a_member_admits_only_fresh_authenticated_requests_for_an_epoch_it_holds():
    ring = OneEpoch()
    admission = SyncAdmission("p", ring)  # type: ignore[arg-type]
    now = 1_000_000
    assert admission.admit(ring.request(4), "r", now) is ring.keys[4]
    assert admission.admit(ring.request(3), "r", now) is ring.keys[3]  # a retiring epoch still counts
    refusals = {
        "stale": (ring.request(4, issued_at_ms=now - REQUEST_FRESHNESS_MS - 1), "r"),
        "unauthenticated": (ring.request(4), "another-queue"),  # the reply queue is part of what is MACed
    }
    for reason, (request, reply_to) in refusals.items():
        with pytest.raises(SyncRefused, match=reason):
            admission.admit(request, reply_to, now)
    with pytest.raises(SyncRefused, match="epoch"):
        SyncAdmission("p", ring).admit(  # type: ignore[arg-type]
            ModelSyncRequest(have=(), worker_id="w", nonce=bytes(32), epoch=5, issued_at_ms=now, mac=bytes(32)),
            "r", now)
    other_pool = SyncAdmission("q", ring)  # type: ignore[arg-type]
    with pytest.raises(SyncRefused, match="unauthenticated"):
        other_pool.admit(ring.request(4), "r", now)


def test_what_a_member_remembers_of_served_requests_is_bounded_and_expires():
    ring = OneEpoch()
    admission = SyncAdmission("p", ring)  # type: ignore[arg-type]
    now = 1_000_000
    first = ring.request(4, issued_at_ms=now)
    admission.admit(first, "r", now)
    with pytest.raises(SyncRefused, match="replayed"):
        admission.admit(first, "r", now + REQUEST_FRESHNESS_MS)
    for _ in range(MAX_REMEMBERED_REQUESTS - 1):
        admission.admit(ring.request(4, issued_at_ms=now + 1), "r", now + 1)
    with pytest.raises(SyncRefused, match="too_many"):
        admission.admit(ring.request(4, issued_at_ms=now + 1), "r", now + 1)
    assert len(admission._taken) == MAX_REMEMBERED_REQUESTS
    # Once they left the window they are refused as stale anyway, and forgotten.
    later = now + REQUEST_FRESHNESS_MS + 2
    admission.admit(ring.request(4, issued_at_ms=later), "r", later)
    assert len(admission._taken) == 1


def test_the_byte_budget_refills_over_its_window():
    budget = SyncBudget()
    assert budget.take(0.0, 100, 60) and not budget.take(0.0, 100, 60)
    assert not budget.take(-50.0, 100, 41)  # a clock stepped back refills nothing
    assert budget.take(model_sync.SYNC_BUDGET_WINDOW_SECONDS, 100, 100)
    assert not budget.take(model_sync.SYNC_BUDGET_WINDOW_SECONDS, 100, 1)


# -- only members write sync messages --------------------------------------------------------------
def test_sync_messages_open_only_in_their_own_sync_and_only_if_a_member_wrote_them():
    pool_key, owner = crypto.generate_private_key(), generate_signing_key()
    data = mlp_model()
    model_id = hashlib.sha256(data).hexdigest()
    manifest = ModelManifest(model_id=model_id, size=len(data), owner_key=public_key_bytes(owner),
                             allowed_producers=None, issued_at_ms=5).sign(owner)
    nonce, version = b"n" * 32, CatalogVersion(5, 1, bytes(32))
    chunks = list(seal_model("p", 3, nonce, pool_key, model_id, data, manifest))
    end = seal_end("p", 3, nonce, pool_key, [manifest], [b"order"], version=version, worker_id="m")
    for message in chunks + [end]:
        assert public_key_bytes(owner) not in message.to_bytes()  # owners and allow-lists travel sealed
    collector = SyncCollector("p", 3, nonce, pool_key)
    assert [collector.add(ModelSyncChunk.from_bytes(c.to_bytes())) for c in chunks + [end]] == \
        [False] * len(chunks) + [True]
    assert list(collector.complete()) == [(model_id, manifest, data)]
    assert (collector.updated_manifests, collector.deletes) == ([manifest], [b"order"])
    assert (collector.member_version, collector.member) == (version, "m")
    # Not in another sync, not at another model id, not for another pool key.
    for other, message in ((SyncCollector("p", 3, b"o" * 32, pool_key), chunks[0]),
                           (SyncCollector("p", 3, nonce, pool_key), dataclasses.replace(chunks[0], model_id="ab" * 32)),
                           (SyncCollector("p", 3, nonce, crypto.generate_private_key()), end)):
        with pytest.raises(DecryptionFailed):
            other.add(message)
    # Nobody without the pool's private key writes one that opens: sealed to the public key
    # (HPKE, as before), or under a key derived from it.
    forged_body = pack({"manifests": [], "deletes": [], "version": version.to_wire(), "worker": "m"})
    aad = model_sync_info("p", 3, nonce, "", 0, 0, 0)
    public = crypto.public_bytes(pool_key)
    gcm_nonce, ciphertext = crypto.seal(model_sync_key(public, "p", 3, nonce), forged_body, aad)
    for sealed in (crypto.hpke_seal(forged_body, public, aad), gcm_nonce + ciphertext):
        with pytest.raises(DecryptionFailed):
            SyncCollector("p", 3, nonce, pool_key).add(ModelSyncChunk(epoch=3, model_id="", index=0, count=0,
                                                                      total_size=0, sealed=sealed))


# -- item 2: a state directory put back from an older copy ----------------------------------------
async def test_a_restored_worker_drops_the_deleted_model_and_the_revoked_producer_despite_a_forged_end_marker(
        tee, memory_url, pool, tmp_path, attacker, caplog):
    owner, alice, bob = generate_signing_key(), generate_signing_key(), generate_signing_key()
    state, copy = tmp_path / "b", tmp_path / "copy"
    member = tee.worker(memory_url, pool, worker_id="a")
    await member.start()
    try:
        async with running_worker(tee, memory_url, pool, state_dir=state, worker_id="b") as b:
            async with AsyncClient(memory_url, pool, tee.policy(), owner_key=owner) as uploader:
                doomed = await uploader.upload_model(mlp_model(seed=3))
                model_id = await uploader.upload_model(mlp_model(), allowed_producers=[public_key_bytes(alice)])
                await wait_until(lambda: b.models.has(doomed) and b.models.has(model_id), "b holds both models")
        shutil.copytree(state, copy)  # the operator's copy, taken while b is stopped
        async with running_worker(tee, memory_url, pool, state_dir=state, worker_id="b") as b:
            async with AsyncClient(memory_url, pool, tee.policy(), owner_key=owner) as uploader:
                await uploader.delete_model(doomed)
                await uploader.upload_model(mlp_model(), allowed_producers=[public_key_bytes(bob)])  # alice revoked
            await wait_until(lambda: not b.models.has(doomed)
                             and b.models.manifest(model_id).allowed_producers == (public_key_bytes(bob),),
                             "b applied the delete and the allow-list change")
        shutil.rmtree(state)
        shutil.copytree(copy, state)  # ... and puts it back

        # A broker client answers the restored worker's sync request first, with the best end
        # marker a non-member can write (nothing to delete, no newer manifest), before the member.
        forged_sent = asyncio.Event()
        real_send = member._model_sync.send

        async def member_answers_after_the_forgery(request, reply_to):
            await asyncio.wait_for(forged_sent.wait(), TIMEOUT)
            await real_send(request, reply_to)
        member._model_sync.send = member_answers_after_the_forgery

        async def forge(delivery: Delivery) -> None:
            await delivery.ack()
            msg = delivery.message
            if control_kind(msg.body) != "model_sync_request":
                return
            nonce, epoch = msgpack.unpackb(msg.body)["nonce"], member.keyring.epoch
            aad = model_sync_info(pool, epoch, nonce, "", 0, 0, 0)
            version = CatalogVersion(2**62, 10**6, bytes(32))
            body = pack({"manifests": [], "deletes": [], "version": version.to_wire(), "worker": "a"})
            gcm_nonce, ciphertext = crypto.seal(model_sync_key(member.pool_public_key, pool, epoch, nonce), body, aad)
            for sealed in (crypto.hpke_seal(pack({"manifests": [], "deletes": []}), member.pool_public_key, aad),
                           gcm_nonce + ciphertext):
                end = ModelSyncChunk(epoch=epoch, model_id="", index=0, count=0, total_size=0, sealed=sealed)
                await attacker.publish_reply(msg.reply_to, Message(body=end.to_bytes()))
            forged_sent.set()
        spy = await attacker.consume_control(pool, forge)
        caplog.set_level(logging.INFO, logger="enclaveq.worker")
        restored = tee.worker(memory_url, pool, state_dir=state, worker_id="b")
        await restored.start()
        try:
            await spy.cancel()
            assert forged_sent.is_set()
            assert not restored.models.has(doomed)
            assert restored.models.manifest(model_id).allowed_producers == (public_key_bytes(bob),)
            assert restored._model_sync.catalog_version == member._model_sync.catalog_version
            assert "was OLDER than member a's" in caplog.text
            await member.stop()  # from now on the restored worker serves alone
            async with AsyncClient(memory_url, pool, tee.policy(), producer_key=alice) as a, \
                    AsyncClient(memory_url, pool, tee.policy(), producer_key=bob) as b:
                with pytest.raises(NotAllowed):
                    await a.run(model_id, X)
                with pytest.raises(UnknownModel):
                    await a.run(doomed, X)
                await b.run(model_id, X)
        finally:
            await restored.stop()
    finally:
        await member.stop()


async def test_a_joiner_keeps_the_delete_orders_of_models_it_never_held_and_matches_the_members_version(
        tee, memory_url, pool, tmp_path):
    owner = generate_signing_key()
    async with running_worker(tee, memory_url, pool) as member:
        async with AsyncClient(memory_url, pool, tee.policy(), owner_key=owner) as uploader:
            gone = await uploader.upload_model(mlp_model(seed=4))
            await uploader.delete_model(gone)
            await uploader.upload_model(mlp_model())
        async with running_worker(tee, memory_url, pool, state_dir=tmp_path / "late") as late:
            assert late._model_sync.catalog_version == member._model_sync.catalog_version
            assert len(late.models.delete_orders()) == 1


def test_a_request_listing_as_many_models_as_allowed_is_dispatched_and_parsed_and_one_more_is_refused():
    from protocol.errors import OversizedMessage
    from protocol.handshake import MAX_SYNC_HAVE

    def listing(n: int) -> bytes:
        return ModelSyncRequest(have=tuple(f"{i:064x}" for i in range(n)), worker_id="w", nonce=bytes(32), epoch=1,
                                issued_at_ms=1, mac=bytes(32)).to_bytes()
    full = listing(MAX_SYNC_HAVE)
    assert control_kind(full) == "model_sync_request"
    assert len(ModelSyncRequest.from_bytes(full).have) == MAX_SYNC_HAVE
    with pytest.raises(OversizedMessage):
        control_kind(listing(MAX_SYNC_HAVE + 1))
    with pytest.raises(OversizedMessage):
        ModelSyncRequest.from_bytes(listing(MAX_SYNC_HAVE + 1))
