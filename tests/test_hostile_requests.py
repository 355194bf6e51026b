"""Hostile sealed requests (issue 9, items 1, 8, 9, 13): what a producer with a session of her own,
plus everything the broker shows her, can make a worker do -- and what she cannot.

* a producer key proof copied from someone else's clear header vouches for nothing in another
  sealed session, not even after its epoch is erased (P7);
* ``model_list`` shows an allow-listed model only to producers on its list and to its owner;
* incomplete uploads are bounded in number, bytes and time, and a failed or expired upload
  releases the jobs waiting for its model at once;
* a recorded job replayed to a restarted worker is not run again, while a job whose result was
  never published before a stop still runs when it is redelivered (P5).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid

import numpy as np
import pytest

from broker_adapters import Message, open_broker
from enclave_worker import uploads as uploads_module
from enclave_worker.errors import JobRejected, ModelRejected
from enclave_worker.replay_guard import SeenJobs, SeenJournal, job_key
from enclave_worker.sealed_state import SealedState
from enclave_worker.uploads import Uploads
from producer_sdk import AsyncClient
from producer_sdk.errors import BadSignature, NotAllowed, UnknownModel
from protocol import bodies
from protocol.envelope import Chunk, ProducerSession
from protocol.ownership import ModelManifest, generate_signing_key, public_key_bytes
from attestation.sim import sealing

from .support import mlp_model, run_directly, running_worker, wait_until

X = {"x": np.ones((2, 4), np.float32), "bias": np.zeros(3, np.float32)}


def counted(worker, kind: str, outcome: str) -> float:
    return worker.metrics.requests.labels(kind, outcome)._value.get()


def impersonate_session_id(mallory: AsyncClient, victim: AsyncClient) -> None:
    """Mallory seals a session key *of her own* to the pool key under the victim's session id
    (both are public: the pool key is attested, the session id is in every clear header) and
    copies the victim's producer key proof from a clear header into her requests."""
    core, statement = mallory._core, mallory._core.statement
    forged = ProducerSession(pool=core.pool, epoch=statement.epoch, pool_public_key=statement.pool_public_key,
                             session_id=victim._core.session.session_id)
    forged.producer_proof = victim._core.session.producer_proof
    core.session = forged
    core._sessions[forged.session_id] = forged


# -- item 1: a proof vouches only for the sealed session it was made for ------------------------------
async def test_a_proof_copied_into_another_sealed_session_under_the_same_id_runs_nothing(tee, memory_url, pool):
    owner, alice = generate_signing_key(), generate_signing_key()
    model = mlp_model()
    async with running_worker(tee, memory_url, pool):
        async with AsyncClient(memory_url, pool, tee.policy(), owner_key=owner) as uploader:
            model_id = await uploader.upload_model(model, allowed_producers=[public_key_bytes(alice)])
        async with AsyncClient(memory_url, pool, tee.policy(), producer_key=alice) as a, \
                AsyncClient(memory_url, pool, tee.policy()) as mallory:
            # Alice runs a job: the worker verified her proof for her sealed session.
            assert np.array_equal((await a.run(model_id, X))["label"], run_directly(model, X)["label"])
            impersonate_session_id(mallory, a)
            with pytest.raises(BadSignature, match="proof of this session does not verify"):
                await mallory.run(model_id, X)
            # Alice's own session is unaffected.
            await a.run(model_id, X)


async def test_a_copied_proof_opens_nothing_after_its_epoch_is_erased_and_nothing_of_that_epoch_stays_cached(
        tee, memory_url, pool):
    owner, alice = generate_signing_key(), generate_signing_key()
    async with running_worker(tee, memory_url, pool) as worker:
        async with AsyncClient(memory_url, pool, tee.policy(), owner_key=owner) as uploader:
            model_id = await uploader.upload_model(mlp_model(), allowed_producers=[public_key_bytes(alice)])
        async with AsyncClient(memory_url, pool, tee.policy(), producer_key=alice) as a:
            await a.run(model_id, X)  # epoch 1: alice's session and proof are cached
            assert worker.cached_session_epochs() == {1}
            await worker.rotate(0)
            await wait_until(lambda: worker.keys.previous == (), "epoch 1 is erased")
            assert 1 not in worker.cached_session_epochs()
            async with AsyncClient(memory_url, pool, tee.policy()) as mallory:
                assert mallory.statement.epoch == 2
                impersonate_session_id(mallory, a)  # alice's id and her epoch-1 proof, in an epoch-2 session
                with pytest.raises(BadSignature):
                    await mallory.run(model_id, X)
            assert worker.cached_session_epochs() == {2}


async def test_a_job_that_waited_for_an_allow_listed_model_still_arriving_is_held_to_its_allow_list(
        tee, memory_url, pool):
    owner, alice = generate_signing_key(), generate_signing_key()
    model = mlp_model()
    async with running_worker(tee, memory_url, pool) as worker:
        async with AsyncClient(memory_url, pool, tee.policy(), owner_key=owner) as uploader, \
                AsyncClient(memory_url, pool, tee.policy()) as mallory:
            model_id, chunks = uploader._core.model_chunks(model, owner_key=owner, allowed_producers=[
                public_key_bytes(alice)], timeout=30, chunk_bytes=len(model) // 2 + 1)
            assert (await uploader._request(chunks[0], 30)).ok
            # Mallory's job arrives while the model is still arriving: no manifest to check yet.
            job = asyncio.create_task(mallory.run(model_id, X, timeout=20))
            await wait_until(lambda: worker.models.waiting_count() == 1, "mallory's job waits for the model")
            assert (await uploader._request(chunks[1], 30)).ok
            with pytest.raises(NotAllowed):
                await job


# -- item 9: model_list hides allow-listed models from producers not on the list -------------------
async def test_model_list_shows_an_allow_listed_model_only_to_its_producers_and_its_owner(tee, memory_url, pool):
    owner, alice, bob = generate_signing_key(), generate_signing_key(), generate_signing_key()
    async with running_worker(tee, memory_url, pool):
        async with AsyncClient(memory_url, pool, tee.policy(), owner_key=owner, producer_key=owner) as by_owner:
            private = await by_owner.upload_model(mlp_model(), allowed_producers=[public_key_bytes(alice)])
            public = await by_owner.upload_model(mlp_model(seed=1))
            async with AsyncClient(memory_url, pool, tee.policy(), producer_key=alice) as a, \
                    AsyncClient(memory_url, pool, tee.policy(), producer_key=bob) as b, \
                    AsyncClient(memory_url, pool, tee.policy()) as anonymous:
                def ids(models):
                    return {m.model_id for m in models}
                assert ids(await a.list_models()) == {private, public}
                assert ids(await by_owner.list_models()) == {private, public}
                assert ids(await b.list_models()) == {public}
                assert ids(await anonymous.list_models()) == {public}
                impersonate_session_id(anonymous, a)  # a copied proof shows nothing either
                with pytest.raises(BadSignature):
                    await anonymous.list_models()


# -- item 8: incomplete uploads are bounded and expire --------------------------------------------
class Uploader:
    """Sends hand-made upload chunks under a client's session, signed by a key of its own."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.key = generate_signing_key()

    def manifest(self, model_id: str, size: int) -> bytes:
        return ModelManifest(model_id=model_id, size=size, owner_key=public_key_bytes(self.key),
                             allowed_producers=None, issued_at_ms=int(time.time() * 1000)).sign(self.key)

    async def send(self, model_id: str, upload_id: str, index: int, count: int, total: int, data: bytes,
                   manifest: bytes | None = None):
        core = self.client._core
        signed = manifest or self.manifest(model_id, total)
        outcome = await self.client._request(lambda: core._seal(
            "model_chunk", bodies.encode_model_chunk(signed, data), timeout=30, content_type=bodies.MODEL_CHUNK,
            model_id=model_id, chunk=Chunk(upload_id=upload_id, index=index, count=count, total_size=total)), 30)
        return outcome


def random_model_id() -> str:
    return hashlib.sha256(os.urandom(16)).hexdigest()


async def test_a_worker_holds_a_bounded_number_of_incomplete_uploads_and_refuses_more_with_a_typed_error(
        tee, memory_url, pool):
    total = 128 * 1024
    async with running_worker(tee, memory_url, pool) as worker:
        async with AsyncClient(memory_url, pool, tee.policy()) as client:
            mallory = Uploader(client)
            limit = uploads_module.MAX_INCOMPLETE_UPLOADS
            for _ in range(limit):
                outcome = await mallory.send(random_model_id(), uuid.uuid4().hex, 0, 2, total, os.urandom(total // 2))
                assert outcome.ok
            refused = await mallory.send(random_model_id(), uuid.uuid4().hex, 0, 2, total, os.urandom(total // 2))
            assert not refused.ok and refused.error().code == bodies.ErrorCode.OVERSIZED
            assert "incomplete uploads" in refused.error().args[0]
            assert len(worker.models.uploads) == limit and worker.models.arriving_count() == limit


async def test_chunks_beyond_the_size_their_upload_declared_are_refused(tee, memory_url, pool):
    async with running_worker(tee, memory_url, pool) as worker:
        async with AsyncClient(memory_url, pool, tee.policy()) as client:
            mallory = Uploader(client)
            model_id, upload_id = random_model_id(), uuid.uuid4().hex
            # Declares 1 byte in 1 chunk... then sends 4 MiB as that chunk.
            outcome = await mallory.send(model_id, upload_id, 0, 1, 1, os.urandom(4 * 1024 * 1024))
            assert not outcome.ok and outcome.error().code == bodies.ErrorCode.MODEL_INVALID
            # Declares 64 KiB in 1,000 chunks: empty or tiny chunks cannot multiply entries.
            outcome = await mallory.send(model_id, uuid.uuid4().hex, 0, 1000, 64 * 1024, b"x")
            assert not outcome.ok and outcome.error().code == bodies.ErrorCode.MODEL_INVALID
            assert worker.models.uploads.held_bytes == 0


async def test_an_upload_that_fails_releases_the_jobs_waiting_for_its_model_at_once(tee, memory_url, pool):
    model = mlp_model()
    model_id, half = hashlib.sha256(model).hexdigest(), len(model) // 2 + 1
    async with running_worker(tee, memory_url, pool) as worker:
        async with AsyncClient(memory_url, pool, tee.policy()) as client:
            mallory = Uploader(client)
            manifest, upload_id = mallory.manifest(model_id, len(model)), uuid.uuid4().hex
            assert (await mallory.send(model_id, upload_id, 0, 2, len(model), model[:half], manifest)).ok
            # A job for the model waits: its upload is in progress on this worker.
            job = asyncio.create_task(client.run(model_id, X, timeout=20))
            await wait_until(lambda: worker.models.waiting_count() == 1, "the job waits for the model")
            # The last chunk is spoiled: the upload fails (the bytes do not hash to the model id).
            spoiled = bytes(len(model) - half)
            outcome = await mallory.send(model_id, upload_id, 1, 2, len(model), spoiled, manifest)
            assert not outcome.ok and outcome.error().code == bodies.ErrorCode.MODEL_INVALID
            # The waiting job is answered now, well within its 20 s (it used to wait 30 s).
            with pytest.raises(UnknownModel):
                await job
            assert worker.models.arriving_count() == 0 and worker.models.waiting_count() == 0


async def test_an_idle_upload_expires_by_the_worker_clock_and_releases_the_jobs_waiting_for_it(
        tee, memory_url, pool):
    skew = [0.0]
    model = mlp_model()
    model_id, half = hashlib.sha256(model).hexdigest(), len(model) // 2 + 1
    async with running_worker(tee, memory_url, pool, clock=lambda: time.time() + skew[0]) as worker:
        async with AsyncClient(memory_url, pool, tee.policy()) as client:
            mallory = Uploader(client)
            assert (await mallory.send(model_id, uuid.uuid4().hex, 0, 2, len(model), model[:half])).ok
            # The job's deadline is far enough that skewing the worker's clock does not expire it.
            job = asyncio.create_task(client.run(model_id, X, timeout=20 + 2 * uploads_module.IDLE_SECONDS))
            await wait_until(lambda: worker.models.waiting_count() == 1, "the job waits for the model")
            skew[0] = uploads_module.IDLE_SECONDS + 1  # the upload has been idle too long
            with pytest.raises(UnknownModel):
                await asyncio.wait_for(job, 20)
            assert len(worker.models.uploads) == 0 and worker.models.arriving_count() == 0


async def test_a_stranger_who_copies_an_upload_id_cannot_spoil_the_owners_upload(tee, memory_url, pool):
    from protocol.envelope import peek_request

    data = mlp_model()
    async with running_worker(tee, memory_url, pool) as worker:
        async with AsyncClient(memory_url, pool, tee.policy(), timeout=10) as owner, \
                AsyncClient(memory_url, pool, tee.policy(), timeout=10) as mallory:
            model_id, chunks = owner._core.model_chunks(data, owner_key=generate_signing_key(), timeout=10,
                                                        chunk_bytes=len(data) // 3 + 1)
            assert len(chunks) == 3
            first = chunks[0]()
            # The upload id and position are clear in every chunk's header: the broker sees them.
            position = peek_request(first.body)[1].chunk
            await owner._request(lambda: first, 10)
            await owner._request(chunks[1], 10)
            # Mallory fills the missing last chunk first, with garbage, under a manifest of her own.
            her_key = generate_signing_key()
            manifest = ModelManifest(model_id=model_id, size=len(data), owner_key=public_key_bytes(her_key),
                                     allowed_producers=None, issued_at_ms=int(time.time() * 1000)).sign(her_key)
            garbage = bytes(len(data) - 2 * (len(data) // 3 + 1))
            forged = mallory._core._seal("model_chunk", bodies.encode_model_chunk(manifest, garbage), timeout=10,
                                         content_type=bodies.MODEL_CHUNK, model_id=model_id,
                                         chunk=Chunk(upload_id=position.upload_id, index=2, count=3,
                                                     total_size=len(data)))
            await mallory._request(lambda: forged, 10)
            outcome = await owner._request(chunks[2], 10)
            assert bodies.decode_ack(outcome.body)["complete"]
            assert worker.models.has(model_id)


def test_uploads_are_bounded_in_bytes_and_expire_when_idle():
    now = [1000.0]
    uploads = Uploads(max_model_bytes=1024 * 1024, max_bytes=256 * 1024, clock=lambda: now[0])
    chunk = os.urandom(64 * 1024)
    for i in range(4):
        uploads.add(f"u{i}", random_model_id(), 0, 2, 128 * 1024, chunk)
    assert uploads.held_bytes == 256 * 1024
    with pytest.raises(JobRejected, match="would exceed") as refused:
        uploads.add("u5", random_model_id(), 0, 2, 128 * 1024, chunk)
    assert refused.value.code == bodies.ErrorCode.OVERSIZED
    uploads.add("u0", uploads._uploads["u0"].model_id, 0, 2, 128 * 1024, chunk)  # a redelivered chunk: no growth
    assert uploads.held_bytes == 256 * 1024
    now[0] += uploads.idle_seconds - 1
    uploads.add("u0", uploads._uploads["u0"].model_id, 0, 2, 128 * 1024, chunk)  # u0 is active
    now[0] += 2
    assert len(uploads.expire()) == 3 and len(uploads) == 1 and uploads.held_bytes == 64 * 1024
    with pytest.raises(ModelRejected, match="disagrees"):
        uploads.add("u0", random_model_id(), 1, 2, 128 * 1024, chunk)


# -- item 13: replays after a restart ---------------------------------------------------------------
async def test_a_job_replayed_to_a_restarted_worker_is_not_run_again(tee, memory_url, pool):
    worker = tee.worker(memory_url, pool)
    await worker.start()
    async with AsyncClient(memory_url, pool, tee.policy()) as client:
        model_id = await client.upload_model(mlp_model())
        # The broker records the sealed job exactly as it crosses; it runs once.
        recorded = client._core.job(model_id, X, timeout=120)
        async with open_broker(memory_url) as broker:
            await broker.publish_job(pool, Message(body=recorded.body, correlation_id=recorded.job_id))
            await wait_until(lambda: counted(worker, "job", "ok") == 1, "the job runs once")
            await worker.stop()
            # Restarted on the same sealed state, the worker is replayed the recording.
            async with running_worker(tee, memory_url, pool) as restarted:
                assert restarted.remembered_jobs() == 2  # the upload's one chunk, and the job
                await broker.publish_job(pool, Message(body=recorded.body, correlation_id=recorded.job_id))
                await wait_until(lambda: counted(restarted, "job", "duplicate") == 1, "the replay is refused",
                                 timeout=10)
                assert counted(restarted, "job", "ok") == 0


async def test_a_copy_replayed_while_the_job_runs_waits_for_it_and_is_not_run_again(tee, memory_url, pool):
    async with running_worker(tee, memory_url, pool) as worker:
        async with AsyncClient(memory_url, pool, tee.policy()) as client:
            model_id = await client.upload_model(mlp_model())
            gate, ran = asyncio.Event(), []
            real_execute = worker._handlers.execute

            async def slow_execute(header, plaintext):  # the job is still running when its copy arrives
                if header.kind == "job":
                    ran.append(header.job_id)
                    await gate.wait()
                return await real_execute(header, plaintext)

            worker._handlers.execute = slow_execute
            recorded = client._core.job(model_id, X, timeout=120)
            async with open_broker(memory_url) as broker:
                await broker.publish_job(pool, Message(body=recorded.body, correlation_id=recorded.job_id))
                await wait_until(lambda: len(ran) == 1, "the job runs")
                await broker.publish_job(pool, Message(body=recorded.body, correlation_id=recorded.job_id))
                await wait_until(lambda: worker._active == 2, "the copy is delivered while the job runs")
                gate.set()
                await wait_until(lambda: counted(worker, "job", "duplicate") == 1, "the copy is dropped", timeout=10)
            assert ran == [recorded.job_id] and counted(worker, "job", "ok") == 1


async def test_a_job_whose_result_was_never_published_before_a_stop_runs_when_redelivered(tee, memory_url, pool):
    model = mlp_model()
    first = tee.worker(memory_url, pool)
    await first.start()
    async with AsyncClient(memory_url, pool, tee.policy()) as client:
        model_id = await client.upload_model(model)
        publishing, never = asyncio.Event(), asyncio.Event()
        real_publish = first._broker.publish_reply

        async def publish_hangs_for_jobs(address, message):  # the worker dies while publishing
            if message.correlation_id and counted(first, "job", "ok"):
                publishing.set()
                await never.wait()
            return await real_publish(address, message)

        first._broker.publish_reply = publish_hangs_for_jobs
        job = asyncio.create_task(client.run(model_id, X, timeout=60))
        await asyncio.wait_for(publishing.wait(), 30)
        await first.stop(drain_timeout=0.1)  # the job goes back to the queue, unanswered
        async with running_worker(tee, memory_url, pool) as second:
            out = await asyncio.wait_for(job, 30)
            assert np.array_equal(out["logits"], run_directly(model, X)["logits"])
            assert counted(second, "job", "ok") == 1


def test_the_replay_set_forgets_jobs_at_their_deadline_and_holds_at_most_its_limit():
    seen = SeenJobs(max_entries=3)
    for i, deadline in enumerate((500, 300, 400, 600)):
        seen.add(job_key(b"s" * 16, f"j{i}"), deadline, now_ms=100)
    # Over the limit, the entry answered longest ago went first.
    assert len(seen) == 3 and not seen.contains(job_key(b"s" * 16, "j0")) and seen.evicted == 1
    seen.add(job_key(b"s" * 16, "j4"), 1000, now_ms=450)  # j1 (300) and j2 (400) have expired
    assert len(seen) == 2 and seen.contains(job_key(b"s" * 16, "j3")) and seen.contains(job_key(b"s" * 16, "j4"))
    seen.add(job_key(b"s" * 16, "j5"), 10, now_ms=450)  # already expired: refused as such, not remembered
    assert not seen.contains(job_key(b"s" * 16, "j5"))


def test_a_replay_set_filled_with_far_deadlines_still_remembers_the_next_job():
    seen = SeenJobs(max_entries=100)
    for i in range(1000):  # an attacker's own jobs, with deadlines a century away, fill the set
        seen.add(job_key(b"a" * 16, f"a{i}"), 2**62, now_ms=0)
    victim = job_key(b"v" * 16, "victim")
    seen.add(victim, 100_000, now_ms=1)  # a job with the SDK's short deadline, answered next
    assert seen.contains(victim)  # only 100 jobs answered after it would push it out
    assert len(seen) == 100 and len(seen._by_deadline) <= 200  # bounded, stale heap entries included


def test_the_replay_journal_seals_segments_deletes_expired_ones_and_merges_many(tmp_path):
    state = SealedState(tmp_path, "p", b"k" * 32, sealing.seal, sealing.unseal)
    SeenJournal(state, writer="0" * 8).flush([(job_key(b"t" * 16, "other"), 3000)], now_ms=0)  # a worker sharing the dir
    journal = SeenJournal(state, max_segments=3, writer="1" * 8)
    for second in range(5):
        journal.flush([(job_key(b"s" * 16, f"j{second}"), 1000 * (second + 1))], now_ms=0)
    assert journal.segments <= 3  # merged
    journal.flush([], now_ms=2500)  # j0 and j1 expired
    reloaded = SeenJournal(state)
    assert sorted(reloaded.load(now_ms=2500)) == sorted(
        [(job_key(b"s" * 16, f"j{i}"), 1000 * (i + 1)) for i in (2, 3, 4)] + [(job_key(b"t" * 16, "other"), 3000)])
    reloaded.flush([], now_ms=10_000)  # it loaded every segment, the other worker's too
    assert list(state.iter_seen_segments()) == []
    # A segment sealed under another sealing key (a TEE whose key does not survive a restart)
    # is skipped, not fatal.
    SeenJournal(SealedState(tmp_path, "p", b"o" * 32, sealing.seal, sealing.unseal)).flush(
        [(job_key(b"u" * 16, "x"), 5000)], now_ms=0)
    assert SeenJournal(state).load(now_ms=0) == []
