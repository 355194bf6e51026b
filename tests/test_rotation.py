"""Pool key rotation (P6): new epochs reach every member, old jobs are served during the grace
period, producers follow without failing a job, and an erased epoch opens nothing -- not even
with a worker's full sealed state."""

from __future__ import annotations

import time

import numpy as np
import pytest

from broker_adapters import Message, open_broker
from enclave_worker.config import WorkerConfig
from enclave_worker.errors import WorkerStartupError
from enclave_worker.keyring import Keyring
from enclave_worker.sealed_state import PoolKeys, SealedState
from producer_sdk import AsyncClient
from producer_sdk.errors import RotationRefused
from protocol import crypto
from protocol.envelope import peek_request
from protocol.errors import DecryptionFailed, MalformedMessage
from protocol.ownership import generate_signing_key
from protocol.handshake import EpochAnnounce, JoinResponse, join_info

from .support import SimTEE, batch_of, mlp_model, run_directly, running_worker, wait_until


def job_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    return batch_of(seed + 1)[seed]


def sealed_state_of(tee: SimTEE, worker) -> SealedState:
    """Everything an attacker who also stole the worker's platform sealing key could read."""
    identity = worker.identity
    return SealedState(worker.sealed_state.dir.parent, worker.pool, identity.sealing_key, identity.seal, identity.unseal)


def keys_in(state: SealedState) -> list:
    keys = state.load_pool_keys()
    return [crypto.load_private_key(keys.pool_private_key)] + [crypto.load_private_key(k.private_key)
                                                               for k in keys.previous]


def opens_with_any(sealed_job: bytes, pool: str, private_keys: list) -> bool:
    _, header = peek_request(sealed_job)
    for key in private_keys:
        try:
            crypto.open_session_key(header.sealed_session, key, pool=pool, epoch=header.epoch,
                                    session_id=header.session_id)
            return True
        except DecryptionFailed:
            continue
    return False


async def test_a_rotation_reaches_every_member_and_the_producer_follows(tee, broker_url, pool, tmp_path):
    model = mlp_model()
    async with running_worker(tee, broker_url, pool) as a, \
            running_worker(tee, broker_url, pool, state_dir=tmp_path / "b") as b:
        async with AsyncClient(broker_url, pool, tee.policy()) as client:
            model_id = await client.upload_model(model)
            assert client.statement.epoch == 1
            epoch, retire_at_ms = await client.rotate_pool(grace_seconds=30)
            assert epoch == 2 and retire_at_ms > time.time() * 1000 + 20_000
            await wait_until(lambda: a.keys.epoch == b.keys.epoch == 2, "both members are at epoch 2")
            assert a.pool_public_key == b.pool_public_key
            assert client.statement.epoch == 2  # rotate_pool re-attests at once
            for i in range(8):  # both members serve the new epoch
                out = await client.run(model_id, job_inputs(i))
                assert np.array_equal(out["logits"], run_directly(model, job_inputs(i))["logits"])
            assert {k.epoch for k in a.keys.previous} == {k.epoch for k in b.keys.previous} == {1}


async def test_jobs_sealed_before_a_rotation_are_served_during_the_grace_period(tee, broker_url, pool):
    model = mlp_model()
    async with running_worker(tee, broker_url, pool):
        async with AsyncClient(broker_url, pool, tee.policy()) as old, \
                AsyncClient(broker_url, pool, tee.policy()) as operator:
            model_id = await old.upload_model(model)
            await operator.rotate_pool(grace_seconds=60)
            assert old.statement.epoch == 1  # has not heard of the rotation yet
            out = await old.run(model_id, job_inputs())
            assert np.array_equal(out["label"], run_directly(model, job_inputs())["label"])
            await wait_until(lambda: old.statement.epoch == 2, "the producer follows")  # the result told it the pool moved on


async def test_after_the_grace_period_a_stale_producer_re_attests_and_its_job_still_runs(tee, broker_url, pool):
    model = mlp_model()
    async with running_worker(tee, broker_url, pool) as worker:
        async with AsyncClient(broker_url, pool, tee.policy()) as stale, \
                AsyncClient(broker_url, pool, tee.policy()) as operator:
            model_id = await stale.upload_model(model)
            await operator.rotate_pool(grace_seconds=0)
            await wait_until(lambda: worker.keys.previous == (), "epoch 1 is erased")
            out = await stale.run(model_id, job_inputs(3))
            assert np.array_equal(out["logits"], run_directly(model, job_inputs(3))["logits"])
            assert stale.statement.epoch == 2


async def test_a_job_captured_before_rotation_cannot_be_opened_after_the_grace_period_even_with_sealed_state(
        tee, memory_url, pool, tmp_path):
    async with running_worker(tee, memory_url, pool) as worker:
        async with AsyncClient(memory_url, pool, tee.policy()) as client:
            model_id = await client.upload_model(mlp_model())
            # The network attacker records the sealed job exactly as it crosses the broker.
            job = client._core.job(model_id, job_inputs(), timeout=60)
            state = sealed_state_of(tee, worker)
            assert opens_with_any(job.body, pool, keys_in(state))  # before rotation: it opens (the test can fail)

            # A grace period that a slow machine does not outlive between these two lines.
            await client.rotate_pool(grace_seconds=5)
            assert opens_with_any(job.body, pool, keys_in(state))  # during the grace period: still served
            await wait_until(lambda: worker.keys.previous == (), "epoch 1 is erased after the grace period")

            # After it: no key in the sealed state opens the captured session, nor does the worker.
            assert state.load_pool_keys().previous == ()
            assert not opens_with_any(job.body, pool, keys_in(state))
            assert 1 not in worker.cached_session_epochs()
            # Replaying it to the pool: the worker cannot open it either (it answers, in clear, only
            # "epoch retired" to the producer's reply queue; nothing is run).
            stale = worker.metrics.requests.labels("job", "stale_epoch")
            async with open_broker(memory_url) as attacker:
                await attacker.publish_job(pool, Message(body=job.body))
            await wait_until(lambda: stale._value.get() == 1, "the worker refuses the replay as a stale epoch")


async def test_a_member_that_was_down_during_a_rotation_catches_up_when_it_restarts(tee, broker_url, pool, tmp_path):
    async with running_worker(tee, broker_url, pool) as a:
        b = tee.worker(broker_url, pool, state_dir=tmp_path / "b")
        await b.start()
        await b.stop()
        async with AsyncClient(broker_url, pool, tee.policy()) as client:
            await client.rotate_pool(grace_seconds=30)
        async with running_worker(tee, broker_url, pool, state_dir=tmp_path / "b") as b_again:
            assert b_again.keys.epoch == 2 and b_again.pool_public_key == a.pool_public_key


async def test_a_member_restored_from_a_copy_of_its_state_drops_the_erased_key_when_a_live_member_answers(
        tee, memory_url, pool, tmp_path):
    import shutil

    async with running_worker(tee, memory_url, pool) as a:
        b = tee.worker(memory_url, pool, state_dir=tmp_path / "b")
        await b.start()
        await b.stop()
        shutil.copytree(tmp_path / "b", tmp_path / "copy")  # the operator keeps a copy (epoch 1)
        async with AsyncClient(memory_url, pool, tee.policy()) as client:
            await client.rotate_pool(grace_seconds=0)  # epoch 1 erased at once
        await wait_until(lambda: a.keys.previous == (), "the live member erased epoch 1")
        shutil.rmtree(tmp_path / "b")
        shutil.copytree(tmp_path / "copy", tmp_path / "b")  # ... and puts it back
        async with running_worker(tee, memory_url, pool, state_dir=tmp_path / "b") as restored:
            # The live member's newer keys replace the restored ones entirely: the erased epoch is
            # neither served nor sealed to disk again.
            assert restored.keyring.epochs() == (2,) and restored.pool_public_key == a.pool_public_key
            assert [k.epoch for k in restored.sealed_state.load_pool_keys().previous] == []


async def test_members_rotate_on_their_own_with_rotate_every(tee, broker_url, pool, tmp_path):
    async with running_worker(tee, broker_url, pool, rotate_every=1.0, rotation_grace=5) as a, \
            running_worker(tee, broker_url, pool, state_dir=tmp_path / "b", rotate_every=1.0, rotation_grace=5) as b:
        await wait_until(lambda: a.keys.epoch >= 3, "two rotations of its own")
        await wait_until(lambda: a.keys.epoch == b.keys.epoch and a.pool_public_key == b.pool_public_key,
                         "both members hold the same epoch key")


async def test_a_grace_period_above_the_measured_cap_is_refused_with_an_encrypted_error(tee, memory_url, pool):
    async with running_worker(tee, memory_url, pool, config=WorkerConfig(max_rotation_grace_seconds=10)) as worker:
        policy = tee.policy(measurements=(worker.identity.measurement.hex(),))
        async with AsyncClient(memory_url, pool, policy) as client:
            with pytest.raises(RotationRefused, match="exceeds"):
                await client.rotate_pool(grace_seconds=11)
            assert worker.keys.epoch == 1


async def test_an_announcement_whose_sealed_key_was_swapped_is_refused(tee, memory_url, pool, tmp_path):
    async with running_worker(tee, memory_url, pool) as a, \
            running_worker(tee, memory_url, pool, state_dir=tmp_path / "b") as b:
        # Build a genuine announcement from a, then swap in a key sealed by someone else.
        announces: list[bytes] = []
        async with open_broker(memory_url) as spy:
            async def keep(delivery):
                announces.append(delivery.message.body)
                await delivery.ack()
            await spy.consume_control(pool, keep)
            await a.rotate(30)
            await wait_until(lambda: any(b'epoch_announce' in m for m in announces), "the announcement is seen")
        genuine = EpochAnnounce.from_bytes(next(m for m in announces if b"epoch_announce" in m))
        other = Keyring(sealed_state_of(tee, b), lambda: int(time.time() * 1000))
        other.adopt(b.keys)
        forged_sealed, _ = other.seal_next(crypto.private_bytes(crypto.generate_private_key()), pool,
                                           genuine.retire_at_ms)
        forged = EpochAnnounce(**{**genuine.__dict__, "sealed_key": forged_sealed,
                                  "statement": genuine.statement})
        keyring = Keyring(sealed_state_of(tee, b), lambda: int(time.time() * 1000))
        keyring.adopt(b.keys)
        with pytest.raises(MalformedMessage, match="does not vouch"):
            keyring.open_announce(forged, pool)


async def test_a_recorded_join_response_and_the_joiners_sealed_state_do_not_give_back_an_erased_epoch(
        tee, memory_url, pool, tmp_path):
    """The key a join response is sealed to lives only for that join: the sealed state keeps
    another identity key, so recording the response and later stealing the state opens nothing."""
    recorded: list[bytes] = []
    async with running_worker(tee, memory_url, pool) as member:
        publish_reply = member._broker.publish_reply

        async def record(address, message):  # the network attacker sees every reply
            recorded.append(message.body)
            return await publish_reply(address, message)

        member._broker.publish_reply = record
        async with running_worker(tee, memory_url, pool, state_dir=tmp_path / "joiner") as joiner:
            async with AsyncClient(memory_url, pool, tee.policy()) as client:
                model_id = await client.upload_model(mlp_model())
                job = client._core.job(model_id, job_inputs(), timeout=60)
                await client.rotate_pool(grace_seconds=1)
                await wait_until(lambda: joiner.keys.previous == (), "the joiner erases epoch 1")
            stolen = sealed_state_of(tee, joiner).load_pool_keys()
    responses = [JoinResponse.from_bytes(body) for body in recorded if b"join_response" in body]
    assert responses, "the joiner got its keys from a recorded join response"
    identity = crypto.load_private_key(stolen.identity_private_key)
    for response in responses:
        st = response.statement
        with pytest.raises(DecryptionFailed):
            crypto.hpke_open(response.sealed_keys, identity,
                             join_info(pool, st.epoch, st.nonce, crypto.public_bytes(identity)))
    assert not opens_with_any(job.body, pool, keys_in(sealed_state_of(tee, joiner)))


async def test_requested_rotations_are_at_least_ten_seconds_apart_and_a_refusal_rotates_nothing(tee, memory_url, pool):
    async with running_worker(tee, memory_url, pool) as worker:
        async with AsyncClient(memory_url, pool, tee.policy()) as client:
            await client.rotate_pool(grace_seconds=5)
            with pytest.raises(RotationRefused, match="rotated .* ago"):
                await client.rotate_pool(grace_seconds=5)
            assert worker.keys.epoch == 2


async def test_a_non_admitted_worker_that_consumed_anyway_could_open_nothing(tee, memory_url, pool, tmp_path):
    """A rogue build of a refused worker that ignores the refusal and founds a key of its own:
    the jobs and model chunks it could take off the broker are sealed to the pool's key."""
    outsider_tee = SimTEE(tmp_path / "outsider")
    async with running_worker(tee, memory_url, pool) as member:
        outsider = outsider_tee.worker(memory_url, pool)
        with pytest.raises(WorkerStartupError, match="refuses to admit"):
            await outsider.start()
        async with AsyncClient(memory_url, pool, tee.policy()) as client:
            model_id = await client.upload_model(mlp_model())
            _, chunks = client._core.model_chunks(mlp_model(), owner_key=generate_signing_key(), timeout=60)
            taken = [client._core.job(model_id, job_inputs(), timeout=60).body, chunks[0]().body]
        # Everything a rogue founder has: a pool key and an identity key of its own.
        rogue_keys = PoolKeys(epoch=1, pool_private_key=crypto.private_bytes(crypto.generate_private_key()),
                              identity_private_key=crypto.private_bytes(crypto.generate_private_key()))
        assert opens_with_any(taken[0], pool, keys_in(sealed_state_of(tee, member)))  # the member can
        for sealed in taken:
            assert not opens_with_any(sealed, pool, [crypto.load_private_key(rogue_keys.pool_private_key),
                                                     crypto.load_private_key(rogue_keys.identity_private_key)])


async def test_a_worker_that_founded_alone_during_a_partition_adopts_the_live_pools_key(tee, memory_url, pool, tmp_path):
    split = tee.worker(f"memory://{pool}-partition", pool, state_dir=tmp_path / "split")
    await split.start()  # founds its own epoch-1 key, cut off from the real pool
    await split.stop()
    async with running_worker(tee, memory_url, pool) as member:
        async with running_worker(tee, memory_url, pool, state_dir=tmp_path / "split") as back:
            assert back.keys.epoch == 1 and back.pool_public_key == member.pool_public_key
