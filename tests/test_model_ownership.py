"""Model ownership and access (P7): owner-signed uploads, owner-only replace and delete, producer
allow-lists, pinned model ids -- every violation answered with a clear, encrypted error."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from enclave_worker.errors import JobRejected
from enclave_worker.ownership import ModelRegistry
from enclave_worker.sealed_state import SealedState
from attestation.sim import sealing
from producer_sdk import AsyncClient
from producer_sdk.errors import BadSignature, JobError, NotAllowed, NotOwner, UnknownModel
from protocol import bodies
from protocol.envelope import Chunk
from protocol.ownership import DeleteOrder, ModelManifest, generate_signing_key, public_key_bytes

from .support import mlp_model, run_directly, running_worker, wait_until

X = {"x": np.ones((2, 4), np.float32), "bias": np.zeros(3, np.float32)}


async def test_only_the_owner_can_replace_or_delete_a_model(tee, broker_url, pool):
    owner, stranger = generate_signing_key(), generate_signing_key()
    model = mlp_model()
    async with running_worker(tee, broker_url, pool):
        async with AsyncClient(broker_url, pool, tee.policy(), owner_key=owner) as client:
            model_id = await client.upload_model(model)
            with pytest.raises(NotOwner, match="belongs to another owner"):
                await client.upload_model(model, owner_key=stranger)
            with pytest.raises(NotOwner, match="only its owner can delete"):
                await client.delete_model(model_id, owner_key=stranger)
            assert np.array_equal((await client.run(model_id, X))["logits"], run_directly(model, X)["logits"])
            await client.delete_model(model_id)
            with pytest.raises(UnknownModel):
                await client.run(model_id, X)


async def test_an_allow_list_admits_exactly_the_listed_producer_keys(tee, broker_url, pool):
    owner, alice, bob = generate_signing_key(), generate_signing_key(), generate_signing_key()
    model = mlp_model()
    async with running_worker(tee, broker_url, pool):
        async with AsyncClient(broker_url, pool, tee.policy(), owner_key=owner) as uploader:
            model_id = await uploader.upload_model(model, allowed_producers=[public_key_bytes(alice)])
            with pytest.raises(NotAllowed, match="no producer key"):
                await uploader.run(model_id, X)  # the owner is not implicitly allowed
        async with AsyncClient(broker_url, pool, tee.policy(), producer_key=alice) as a, \
                AsyncClient(broker_url, pool, tee.policy(), producer_key=bob) as b:
            assert np.array_equal((await a.run(model_id, X))["label"], run_directly(model, X)["label"])
            with pytest.raises(NotAllowed, match=public_key_bytes(bob).hex()):
                await b.run(model_id, X)
        # The owner replaces the manifest (same bytes, newer signature): now bob, not alice.
        async with AsyncClient(broker_url, pool, tee.policy(), owner_key=owner) as uploader:
            await uploader.upload_model(model, allowed_producers=[public_key_bytes(bob).hex()])
        async with AsyncClient(broker_url, pool, tee.policy(), producer_key=alice) as a, \
                AsyncClient(broker_url, pool, tee.policy(), producer_key=bob) as b:
            await b.run(model_id, X)
            with pytest.raises(NotAllowed):
                await a.run(model_id, X)


async def test_a_producer_key_proof_from_another_session_does_not_verify(tee, memory_url, pool):
    owner, alice = generate_signing_key(), generate_signing_key()
    async with running_worker(tee, memory_url, pool):
        async with AsyncClient(memory_url, pool, tee.policy(), owner_key=owner) as uploader:
            model_id = await uploader.upload_model(mlp_model(), allowed_producers=[public_key_bytes(alice)])
        async with AsyncClient(memory_url, pool, tee.policy(), producer_key=alice) as a, \
                AsyncClient(memory_url, pool, tee.policy()) as mallory:
            # Mallory copies alice's proof into her own session: the proof names alice's session.
            mallory._core.session.producer_proof = a._core.session.producer_proof
            with pytest.raises(BadSignature, match="proof of this session does not verify"):
                await mallory.run(model_id, X)


async def test_an_unsigned_upload_is_refused_with_an_encrypted_error(tee, memory_url, pool):
    model = mlp_model()
    async with running_worker(tee, memory_url, pool):
        async with AsyncClient(memory_url, pool, tee.policy()) as client:
            core = client._core
            model_id = hashlib.sha256(model).hexdigest()
            outcome = await client._request(lambda: core._seal(
                "model_chunk", model, timeout=30, content_type=bodies.BYTES, model_id=model_id,
                chunk=Chunk(upload_id="u1", index=0, count=1, total_size=len(model))), 30)
            assert not outcome.ok and outcome.error().code == bodies.ErrorCode.BAD_SIGNATURE
            assert "signed manifest" in outcome.error().args[0]
            with pytest.raises(UnknownModel):
                await client.run(model_id, X)


async def test_a_result_naming_another_model_is_refused_by_the_producer(tee, memory_url, pool):
    async with running_worker(tee, memory_url, pool) as worker:
        async with AsyncClient(memory_url, pool, tee.policy()) as client:
            model_id = await client.upload_model(mlp_model())
            other_id = await client.upload_model(mlp_model(seed=1))
            real_execute = worker._handlers.execute

            async def run_the_other_model(header, plaintext):  # a misbehaving worker
                return await real_execute(dataclasses.replace(header, model_id=other_id), plaintext)

            worker._handlers.execute = run_the_other_model
            original_reply = worker._reply

            async def reply_naming_other(delivery, header, *args, **kwargs):
                return await original_reply(delivery, dataclasses.replace(header, model_id=other_id), *args, **kwargs)

            worker._reply = reply_naming_other
            with pytest.raises(JobError, match="not the pinned"):
                await client.run(model_id, X)


async def test_a_worker_down_during_a_delete_deletes_the_model_when_it_returns(tee, broker_url, pool, tmp_path):
    owner = generate_signing_key()
    async with running_worker(tee, broker_url, pool) as a:
        b = tee.worker(broker_url, pool, state_dir=tmp_path / "b")
        await b.start()
        async with AsyncClient(broker_url, pool, tee.policy(), owner_key=owner) as client:
            model_id = await client.upload_model(mlp_model())
            # The upload returned on whichever worker confirmed first; the other may still be
            # writing its copy (the delete below must find it on a, whichever took the upload).
            await wait_until(lambda: a.models.has(model_id) and b.models.has(model_id), "both workers store the upload")
            await b.stop()
            await client.delete_model(model_id)
        b_again = tee.worker(broker_url, pool, state_dir=tmp_path / "b")
        await b_again.start()
        try:
            assert not b_again.models.has(model_id)
            assert not (tmp_path / "b" / pool / "models" / f"{model_id}.sealed").exists()
        finally:
            await b_again.stop()


async def test_a_late_joiner_enforces_the_allow_list_it_synced(tee, broker_url, pool, tmp_path):
    owner, alice, bob = generate_signing_key(), generate_signing_key(), generate_signing_key()
    async with running_worker(tee, broker_url, pool) as first:
        async with AsyncClient(broker_url, pool, tee.policy(), owner_key=owner) as uploader:
            model_id = await uploader.upload_model(mlp_model(), allowed_producers=[public_key_bytes(alice)])
        async with running_worker(tee, broker_url, pool, state_dir=tmp_path / "late") as late:
            assert late.models.manifest(model_id) == first.models.manifest(model_id)
            with pytest.raises(JobRejected, match="did not allow"):
                late.models.require_allowed(model_id, public_key_bytes(bob))


# -- the registry's rules, directly ---------------------------------------------------------------
@pytest.fixture
def registry(tmp_path):
    state = SealedState(tmp_path, "p", b"k" * 32, sealing.seal, sealing.unseal)
    return ModelRegistry(state), state


def signed_manifest(key, model_id="ab" * 32, issued_at_ms=1000, allowed=None) -> tuple[ModelManifest, bytes]:
    m = ModelManifest(model_id=model_id, size=10, owner_key=public_key_bytes(key), allowed_producers=allowed,
                      issued_at_ms=issued_at_ms)
    return m, m.sign(key)


def test_an_older_manifest_cannot_replace_a_newer_one(registry):
    reg, _ = registry
    owner = generate_signing_key()
    reg.record(*signed_manifest(owner, issued_at_ms=2000))
    with pytest.raises(JobRejected, match="older than the one in force") as exc:
        reg.check_upload("ab" * 32, signed_manifest(owner, issued_at_ms=1000)[1])
    assert exc.value.code == bodies.ErrorCode.STALE_ORDER


def test_a_delete_order_older_than_the_manifest_deletes_nothing(registry):
    reg, _ = registry
    owner = generate_signing_key()
    reg.record(*signed_manifest(owner, issued_at_ms=2000))
    old_order = DeleteOrder(model_id="ab" * 32, owner_key=public_key_bytes(owner), issued_at_ms=1500).sign(owner)
    with pytest.raises(JobRejected, match="older than the model's manifest"):
        reg.check_delete("ab" * 32, old_order)


def test_a_replayed_upload_signed_before_its_delete_is_refused_even_after_a_restart(registry):
    reg, state = registry
    owner = generate_signing_key()
    manifest, signed = signed_manifest(owner, issued_at_ms=1000)
    reg.record(manifest, signed)
    order = DeleteOrder(model_id="ab" * 32, owner_key=public_key_bytes(owner), issued_at_ms=2000).sign(owner)
    reg.forget(reg.check_delete("ab" * 32, order), order)
    restarted = ModelRegistry(state)
    with pytest.raises(JobRejected, match="deleted this model after signing"):
        restarted.check_upload("ab" * 32, signed)
    restarted.check_upload("ab" * 32, signed_manifest(owner, issued_at_ms=3000)[1])  # a new upload is fine


def test_tampered_or_foreign_signatures_are_refused_as_bad_signatures(registry):
    reg, _ = registry
    owner = generate_signing_key()
    _, signed = signed_manifest(owner)
    tampered = signed[:-1] + bytes([signed[-1] ^ 1])
    for bad in (tampered, signed[:20], b"", DeleteOrder(model_id="ab" * 32, owner_key=public_key_bytes(owner),
                                                       issued_at_ms=1).sign(owner)):
        with pytest.raises(JobRejected) as exc:
            reg.check_upload("ab" * 32, bad)
        assert exc.value.code == bodies.ErrorCode.BAD_SIGNATURE
    with pytest.raises(JobRejected, match="another model id"):
        reg.check_upload("cd" * 32, signed)


async def test_an_allow_list_change_reaches_a_worker_that_was_down(tee, broker_url, pool, tmp_path):
    owner, alice, bob = generate_signing_key(), generate_signing_key(), generate_signing_key()
    model = mlp_model()
    async with running_worker(tee, broker_url, pool):
        b = tee.worker(broker_url, pool, state_dir=tmp_path / "b")
        await b.start()
        async with AsyncClient(broker_url, pool, tee.policy(), owner_key=owner) as uploader:
            model_id = await uploader.upload_model(model, allowed_producers=[public_key_bytes(alice)])
            await b.stop()
            await uploader.upload_model(model, allowed_producers=[public_key_bytes(bob)])
        b_again = tee.worker(broker_url, pool, state_dir=tmp_path / "b")
        await b_again.start()
        try:
            assert b_again.models.manifest(model_id).allowed_producers == (public_key_bytes(bob),)
        finally:
            await b_again.stop()


# -- model sync messages ---------------------------------------------------------------------------
def test_model_sync_messages_hide_owners_and_open_only_in_their_own_sync_session():
    from enclave_worker.model_sync import SyncCollector, seal_end, seal_model
    from enclave_worker.ownership import CatalogVersion
    from protocol import crypto
    from protocol.errors import DecryptionFailed

    pool_key = crypto.generate_private_key()
    owner = generate_signing_key()
    data = mlp_model()
    model_id = hashlib.sha256(data).hexdigest()
    manifest = ModelManifest(model_id=model_id, size=len(data), owner_key=public_key_bytes(owner),
                             allowed_producers=None, issued_at_ms=5).sign(owner)
    nonce, other_nonce = b"n" * 32, b"o" * 32
    chunks = list(seal_model("p", 3, nonce, pool_key, model_id, data, manifest))
    end = seal_end("p", 3, nonce, pool_key, [manifest], [], version=CatalogVersion(5, 1, bytes(32)), worker_id="m")
    for message in chunks + [end]:
        assert public_key_bytes(owner) not in message.to_bytes()  # owners and allow-lists travel sealed
    replayed_into = SyncCollector("p", 3, other_nonce, pool_key)
    with pytest.raises(DecryptionFailed):
        replayed_into.add(chunks[0])
    collector = SyncCollector("p", 3, nonce, pool_key)
    assert [collector.add(c) for c in chunks + [end]] == [False] * len(chunks) + [True]
    assert list(collector.complete()) == [(model_id, manifest, data)]
    assert collector.updated_manifests == [manifest]
    moved = dataclasses.replace(chunks[0], model_id="ab" * 32)  # swapped to another model id
    with pytest.raises(DecryptionFailed):
        SyncCollector("p", 3, nonce, pool_key).add(moved)


async def test_a_worker_that_lost_its_broker_connection_catches_up_on_missed_uploads(tee, memory_url, pool, tmp_path):
    owner = generate_signing_key()
    async with running_worker(tee, memory_url, pool):
        async with running_worker(tee, memory_url, pool, state_dir=tmp_path / "b") as b:
            async with AsyncClient(memory_url, pool, tee.policy(), owner_key=owner) as client:
                old_id = await client.upload_model(mlp_model(seed=2))
                # The upload returned on the first worker's confirmation; b may still be writing its copy.
                await wait_until(lambda: b.models.has(old_id), "the second worker stores the first upload")
                # b's connection is down: its control queue is gone, so it misses an upload and a delete.
                await b._subs[0].cancel()
                model_id = await client.upload_model(mlp_model())
                await client.delete_model(old_id)
                b._subs[0] = await b._broker.consume_control(pool, b._control.on_message)
                assert not b.models.has(model_id) and b.models.has(old_id)
                b._broker._reconnected()  # what the adapter does once the connection is back
                await wait_until(lambda: b.models.has(model_id) and not b.models.has(old_id),
                                 "the worker catches up on the upload and the delete it missed after the reconnect")
