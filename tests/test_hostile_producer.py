"""A producer facing a hostile broker (issue 9, items 2, 10, 11, 12): it never goes back to an older
pool epoch than one it used, not even after a restart (P13); a forged answer to its attestation
challenge cannot fail ``connect()`` while a genuine one follows; and every wait on the network,
publishing included, ends within the caller's timeout."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import shutil
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import producer_sdk.async_client as async_client
from attestation.policy import write_policy
from broker_adapters import BrokerAdapter, BrokerUnavailable, Delivery, Message, open_broker
from broker_adapters.amqp import AmqpBroker
from broker_adapters.errors import PublishTimeout
from enclave_worker.platform import sim_identity
from enclaveq.cli import cli
from enclave_worker.worker import Worker
from producer_sdk import AsyncClient
from producer_sdk.core import ATTESTATION_PREFIX, MAX_VERIFICATIONS_PER_CHALLENGE
from producer_sdk.epochs import MAX_POOLS, EpochMarks, forget_pool, marks_for
from producer_sdk.errors import AttestationFailed, EpochRollback, JobTimeout, NoWorkerAnswered
from protocol import crypto
from protocol.handshake import Challenge, ControlError, EvidenceResponse, Statement, control_kind

from .support import SimTEE, mlp_model, running_worker

INPUTS = {"x": np.ones((1, 4), np.float32), "bias": np.zeros(3, np.float32)}


# -- a worker whose sealed state an operator saved, and brought back after the pool rotated --------

def saved_state(tee: SimTEE, into: Path) -> Path:
    """A copy of the worker's state directory as it is now: what the operator keeps for later."""
    shutil.copytree(tee.state_dir, into)
    return into


def rolled_back_worker(tee: SimTEE, url: str, pool: str, state_dir: Path) -> Worker:
    """A genuine worker (same TEE, same measurement) serving the saved, older keys. Never started:
    the test only asks it for evidence, as a broker routing challenges to it would."""
    worker = tee.worker(url, pool, state_dir=state_dir)
    worker.keyring.adopt(worker.sealed_state.load_pool_keys())
    return worker


@contextlib.asynccontextmanager
async def answering_challenges(url: str, pool: str, worker: Worker) -> AsyncIterator[None]:
    """The saved worker answers every challenge on the pool's control channel."""
    async with open_broker(url) as broker:
        async def answer(delivery: Delivery) -> None:
            message = delivery.message
            if control_kind(message.body) == "challenge" and message.reply_to:
                response = worker.answer_challenge(Challenge.from_bytes(message.body))
                await broker.publish_reply(message.reply_to, Message(body=response.to_bytes(),
                                                                     correlation_id=message.correlation_id))
            await delivery.ack()

        subscription = await broker.consume_control(pool, answer)
        try:
            yield
        finally:
            await subscription.cancel()


Forge = Callable[[bytes], list[bytes]]


def answer_first(monkeypatch: pytest.MonkeyPatch, broker: BrokerAdapter, forge: Forge,
                 sent: list[bytes] | None = None) -> list[bytes]:
    """Before each challenge the client sends leaves, put ``forge(nonce)`` on its reply queue under
    the challenge's correlation id: what a broker (which sees the nonce) can always do. Returns
    the list of forged answers sent."""
    sent = [] if sent is None else sent
    publish = broker.publish_control

    async def publish_control(pool: str, message: Message) -> None:
        if (message.correlation_id or "").startswith(ATTESTATION_PREFIX) and message.reply_to:
            for body in forge(Challenge.from_bytes(message.body).nonce):
                await broker.publish_reply(message.reply_to, Message(body=body, correlation_id=message.correlation_id))
                sent.append(body)
        await publish(pool, message)

    monkeypatch.setattr(broker, "publish_control", publish_control)
    return sent


def answer_first_on_connect(monkeypatch: pytest.MonkeyPatch, forge: Forge) -> list[bytes]:
    """``answer_first`` on the adapter a client opens when it connects."""
    sent: list[bytes] = []
    real = async_client.open_broker

    def opening(url: str) -> BrokerAdapter:
        broker = real(url)
        answer_first(monkeypatch, broker, forge, sent)
        return broker

    monkeypatch.setattr(async_client, "open_broker", opening)
    return sent


def count_verifications(client: AsyncClient) -> list[int]:
    """How many answers the client's core ran the evidence verifier on (one counter, in a list)."""
    count = [0]
    core = client._core
    assert core is not None
    verify = core._verify

    def counting(*args, **kwargs):
        count[0] += 1
        return verify(*args, **kwargs)

    core._verify = counting
    return count


# -- items 2 and 12: never an older epoch than one already used (P13) ---------------------------

async def test_a_restarted_producer_refuses_a_pool_that_attests_an_older_epoch_than_it_used(tee, memory_url, pool,
                                                                                          tmp_path):
    state_file = tmp_path / "producer" / "epochs.json"
    async with running_worker(tee, memory_url, pool):
        saved = saved_state(tee, tmp_path / "saved-state")  # epoch 1
        async with AsyncClient(memory_url, pool, tee.policy(), epoch_state=state_file) as first:
            await first.rotate_pool(grace_seconds=30)
            assert first.statement.epoch == 2
    assert json.loads(state_file.read_text())["pools"][pool]["epoch"] == 2
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert sorted(p.name for p in state_file.parent.iterdir()) == ["epochs.json"]  # no scratch file left

    # The live worker is gone; the operator puts the saved state back and the broker routes every
    # challenge to it. Its evidence is genuine: a producer that remembers nothing accepts epoch 1.
    async with answering_challenges(memory_url, pool, rolled_back_worker(tee, memory_url, pool, saved)):
        async with AsyncClient(memory_url, pool, tee.policy(), epoch_state=False) as forgetful:
            assert forgetful.statement.epoch == 1

        # A new client process, same state file: refused, naming both epochs, the file and the key.
        with pytest.raises(EpochRollback) as refused:
            await AsyncClient(memory_url, pool, tee.policy(), epoch_state=state_file, attest_timeout=1).connect()
        assert (refused.value.epoch, refused.value.newest) == (1, 2)
        message = str(refused.value)
        assert "epoch 1" in message and "epoch 2" in message and str(state_file) in message and repr(pool) in message

        # A pool deliberately re-created under the same name: forgetting its mark lets it in again.
        assert forget_pool(pool, state_file)
        async with AsyncClient(memory_url, pool, tee.policy(), epoch_state=state_file) as again:
            assert again.statement.epoch == 1


async def test_a_re_attestation_after_a_rotation_never_goes_back_to_an_older_epoch(tee, broker_url, pool, tmp_path,
                                                                                  monkeypatch):
    worker = tee.worker(broker_url, pool)
    await worker.start()
    try:
        saved = saved_state(tee, tmp_path / "saved-state")
        async with AsyncClient(broker_url, pool, tee.policy(), epoch_state=False) as client:
            model_id = await client.upload_model(mlp_model())
            await client.rotate_pool(grace_seconds=30)
            assert client.statement.epoch == 2
            # A worker that missed the rotation (the broker held the epoch announcement back from
            # it) answers the next challenge first; the up-to-date worker answers after it.
            old = rolled_back_worker(tee, broker_url, pool, saved)
            publish_control = client._broker.publish_control
            forged = answer_first(monkeypatch, client._broker,
                                  lambda nonce: [old.answer_challenge(Challenge(nonce)).to_bytes()])
            await client.attest()
            assert len(forged) == 1
            assert client.statement.epoch == 2 and client._core.epoch == 2
            await client.run(model_id, INPUTS)

            # Only the worker that missed the rotation is left to answer: re-attesting fails, and
            # the client keeps sealing to the epoch it had.
            monkeypatch.setattr(client._broker, "publish_control", publish_control)
            await worker.stop()
            client.attest_timeout = 1
            async with answering_challenges(broker_url, pool, old):
                with pytest.raises(EpochRollback, match="epoch 1, older than epoch 2"):
                    await client.attest()
            assert client.statement.epoch == 2 and client._core.epoch == 2
    finally:
        await worker.stop()


async def test_a_result_naming_a_newer_epoch_raises_the_mark(tee, memory_url, pool, tmp_path, monkeypatch):
    state_file = tmp_path / "epochs.json"
    async with running_worker(tee, memory_url, pool):
        async with AsyncClient(memory_url, pool, tee.policy(), epoch_state=state_file) as stale, \
                AsyncClient(memory_url, pool, tee.policy(), epoch_state=False) as operator:
            model_id = await stale.upload_model(mlp_model())
            await operator.rotate_pool(grace_seconds=60)
            monkeypatch.setattr(stale, "_start_refresh", lambda: None)  # only the result may teach it the epoch
            await stale.run(model_id, INPUTS)  # sealed to epoch 1, served in the grace period
            assert stale.statement.epoch == 1
    assert EpochMarks(state_file).newest(pool).epoch == 2


async def test_a_corrupt_epoch_file_is_set_aside_with_a_warning_and_never_fails_the_client(tee, memory_url, pool,
                                                                                          tmp_path, caplog):
    state_file = tmp_path / "epochs.json"
    state_file.write_bytes(b'{"version": 1, "pools": {"p": {"epoch": "two"}}')
    async with running_worker(tee, memory_url, pool):
        with caplog.at_level(logging.WARNING, logger="enclaveq.producer"):
            async with AsyncClient(memory_url, pool, tee.policy(), epoch_state=state_file) as client:
                await client.rotate_pool(grace_seconds=30)
    assert str(state_file) in caplog.text and "corrupt" in caplog.text
    assert state_file.with_name("epochs.json.corrupt").read_bytes().startswith(b'{"version": 1')
    assert EpochMarks(state_file).newest(pool).epoch == 2


def test_the_epoch_file_keeps_the_most_recently_raised_marks_and_only_marks_above_the_first_epoch(tmp_path):
    state_file = tmp_path / "epochs.json"
    clock = iter(range(10**6))
    marks = EpochMarks(state_file, clock=lambda: next(clock))
    marks.observe("never-rotated", 1)
    assert not state_file.exists()  # a pool at epoch 1 leaves no trace: every pool starts there
    for i in range(MAX_POOLS + 5):
        marks.observe(f"pool-{i}", 2)
    kept = json.loads(state_file.read_text())["pools"]
    assert len(kept) == MAX_POOLS and "pool-0" not in kept and f"pool-{MAX_POOLS + 4}" in kept
    marks.observe("pool-0", 1)
    assert EpochMarks(state_file).newest("pool-0") is None  # evicted from the file and never raised again
    assert marks.newest("pool-0").epoch == 2  # this client still remembers it


def test_the_default_epoch_file_is_in_enclaveq_home_except_for_in_process_brokers(enclaveq_home):
    assert marks_for(None, "amqp://guest:guest@127.0.0.1/").path == enclaveq_home / "epochs.json"
    assert marks_for(None, "memory://x").path is None  # its pools die with the process
    assert marks_for(False, "amqp://h/").path is None
    assert marks_for(enclaveq_home / "mine.json", "memory://x").path == enclaveq_home / "mine.json"


# -- item 10: the first answer that verifies, not the first answer --------------------------------

def strangers_answer(other: SimTEE, pool: str, nonce: bytes) -> EvidenceResponse:
    """Genuine evidence from a TEE the policy does not trust (its own simulation root), about a
    pool key of its own: what anyone with a TEE of their own can produce for a nonce they saw."""
    identity = sim_identity(other.dir)
    statement = Statement(pool=pool, epoch=1, suite=crypto.SUITE_ID,
                          pool_public_key=crypto.public_bytes(crypto.generate_private_key()),
                          worker_identity_key=bytes(32), nonce=nonce, config_digest=identity.config_digest)
    return EvidenceResponse(platform=identity.provider.platform,
                            evidence=identity.provider.evidence(statement.report_data()),
                            statement=statement, worker_id="stranger")


def test_genuine_evidence_for_an_unusable_pool_key_is_a_refusal_not_a_crash(tee, pool):
    from producer_sdk.core import ProducerCore

    # Only a TEE the policy trusts can vouch for it (a worker bug, or a compromised measurement):
    # a small-order X25519 point, with which no shared secret can be computed.
    core = ProducerCore(pool=pool, policy=tee.policy(), reply_to="r", epochs=marks_for(False, "memory://x"))
    correlation_id, _ = core.challenge()
    nonce = core._challenges[correlation_id].nonce
    identity = sim_identity(tee.dir)
    statement = Statement(pool=pool, epoch=1, suite=crypto.SUITE_ID, pool_public_key=bytes(32),
                          worker_identity_key=bytes(32), nonce=nonce, config_digest=identity.config_digest)
    answer = EvidenceResponse(platform=identity.provider.platform, worker_id="w", statement=statement,
                              evidence=identity.provider.evidence(statement.report_data()))
    with pytest.raises(AttestationFailed, match="not a usable X25519 key"):
        core.accept_evidence(correlation_id, answer.to_bytes(), keep_open=True)
    assert core.session is None and core.challenge_open(correlation_id)  # another answer may still verify


def forgeries(tmp_path: Path, pool: str) -> dict[str, Forge]:
    other = SimTEE(tmp_path / "other-tee")

    def brokers_key(nonce: bytes) -> list[bytes]:
        # A well-formed answer to this very challenge, naming a key the broker holds; the
        # evidence is over another statement.
        response = strangers_answer(other, pool, nonce)
        st = dataclasses.replace(response.statement, pool_public_key=crypto.public_bytes(crypto.generate_private_key()))
        return [dataclasses.replace(response, statement=st).to_bytes()]

    return {
        "garbage": lambda nonce: [b"\x81\xa1t\xa8evidence" + nonce],
        "control_error": lambda nonce: [ControlError(code="evidence_unavailable", message="no TEE").to_bytes()],
        "replayed": lambda nonce: [strangers_answer(other, pool, b"\x07" * 32).to_bytes()],
        "statement_with_the_brokers_key": brokers_key,
        "another_tees_evidence": lambda nonce: [strangers_answer(other, pool, nonce).to_bytes()],
    }


@pytest.mark.parametrize("kind", ["garbage", "control_error", "replayed", "statement_with_the_brokers_key",
                                  "another_tees_evidence"])
async def test_a_forged_answer_before_the_genuine_one_does_not_fail_connect(tee, memory_url, pool, tmp_path,
                                                                           monkeypatch, kind):
    forge = forgeries(tmp_path, pool)[kind]
    async with running_worker(tee, memory_url, pool) as worker:
        forged = answer_first_on_connect(monkeypatch, forge)
        async with AsyncClient(memory_url, pool, tee.policy()) as client:
            assert len(forged) == 1
            assert client.statement.pool_public_key == worker.pool_public_key


async def test_a_forged_answer_before_the_genuine_one_does_not_fail_connect_over_rabbitmq(tee, rabbitmq_url, pool,
                                                                                         monkeypatch):
    async with running_worker(tee, rabbitmq_url, pool) as worker:
        forged = answer_first_on_connect(monkeypatch, lambda nonce: [
            b"garbage", ControlError(code="evidence_unavailable", message="no TEE").to_bytes()])
        async with AsyncClient(rabbitmq_url, pool, tee.policy()) as client:
            assert len(forged) == 2
            assert client.statement.pool_public_key == worker.pool_public_key


async def test_when_no_answer_verifies_the_most_informative_refusal_is_reported(tee, memory_url, pool, monkeypatch):
    async with running_worker(tee, memory_url, pool):
        answer_first_on_connect(monkeypatch, lambda nonce: [
            b"garbage", ControlError(code="evidence_unavailable", message="no TEE").to_bytes()])
        client = AsyncClient(memory_url, pool, tee.policy(measurements=("ab" * 32,)), attest_timeout=1)
        with pytest.raises(AttestationFailed) as refused:
            await client.connect()
    # The genuine worker's policy violation, not the forgeries that came first.
    assert "measurement" in {v.field for v in refused.value.violations}
    assert not isinstance(refused.value, NoWorkerAnswered)


async def test_a_policy_the_pool_violates_fails_soon_after_the_refusal_not_at_the_attest_timeout(
        tee, memory_url, pool):
    async with running_worker(tee, memory_url, pool):
        client = AsyncClient(memory_url, pool, tee.policy(measurements=("ab" * 32,)), attest_timeout=300)
        # Bounded by the refusal grace (about a second), not by the 300 s attest timeout.
        with pytest.raises(AttestationFailed) as refused:
            await asyncio.wait_for(client.connect(), 60)
    assert "measurement" in {v.field for v in refused.value.violations}


async def test_workers_busy_with_a_flood_of_challenges_are_asked_again_until_they_answer(tee, memory_url, pool):
    from enclave_worker.budget import TokenBucket

    async with running_worker(tee, memory_url, pool) as worker:
        # A flood just spent this worker's evidence budget: it answers "busy" until a token is back.
        worker._attester.evidence_budget = budget = TokenBucket(rate=2.0, burst=1)
        assert budget.try_take()
        answers: list[str] = []
        real_answer = worker._attester.answer_in_thread

        async def counted(challenge):
            answers.append("busy" if not budget.available() else "evidence")
            return await real_answer(challenge)

        worker._attester.answer_in_thread = counted
        async with AsyncClient(memory_url, pool, tee.policy(), attest_timeout=30) as client:
            assert client.claims is not None
    assert answers[0] == "busy" and answers[-1] == "evidence"


async def test_a_flood_of_cheap_forgeries_costs_no_verification_and_the_genuine_answer_still_wins(
        tee, memory_url, pool, monkeypatch):
    async with running_worker(tee, memory_url, pool):
        async with AsyncClient(memory_url, pool, tee.policy()) as client:
            verifications = count_verifications(client)
            forged = answer_first(monkeypatch, client._broker, lambda nonce: [b"garbage"] * 200)
            await client.attest()
            assert len(forged) == 200 and verifications == [1]


async def test_each_challenge_runs_the_verifier_a_bounded_number_of_times(tee, memory_url, pool, tmp_path,
                                                                         monkeypatch):
    other = SimTEE(tmp_path / "other-tee")
    async with running_worker(tee, memory_url, pool):
        async with AsyncClient(memory_url, pool, tee.policy()) as client:
            verifications = count_verifications(client)
            # Nonce-matching forgeries (only someone who sees the challenge can make them) each cost
            # a verification; the challenge examines a bounded number, then gives up at once.
            answer_first(monkeypatch, client._broker,
                         lambda nonce: [strangers_answer(other, pool, nonce).to_bytes()] * (MAX_VERIFICATIONS_PER_CHALLENGE + 8))
            with pytest.raises(AttestationFailed):
                await asyncio.wait_for(client.attest(), 30)
            assert verifications == [MAX_VERIFICATIONS_PER_CHALLENGE]


# -- item 11: the caller's timeout covers publishing ------------------------------------------------

async def never(*args, **kwargs) -> None:
    """A publish the broker takes and never confirms."""
    await asyncio.Event().wait()


async def test_run_and_submit_time_out_when_the_broker_never_confirms_a_publish(tee, broker_url, pool, monkeypatch):
    async with running_worker(tee, broker_url, pool):
        async with AsyncClient(broker_url, pool, tee.policy()) as client:
            model_id = await client.upload_model(mlp_model())
            monkeypatch.setattr(client._broker, "publish_job", never)
            monkeypatch.setattr(client._broker, "publish_control", never)
            with pytest.raises(JobTimeout, match="did not confirm"):
                await asyncio.wait_for(client.run(model_id, INPUTS, timeout=0.5), 10)
            results = await asyncio.wait_for(
                _collect(client.submit(model_id, [INPUTS] * 3, timeout=0.5)), 10)
            assert [type(r.error) for r in results] == [JobTimeout] * 3
            with pytest.raises(JobTimeout, match="did not confirm"):
                await asyncio.wait_for(client.upload_model(mlp_model(seed=1), timeout=0.5), 10)


async def _collect(results):
    return [r async for r in results]


async def test_connect_times_out_when_the_broker_never_confirms_the_challenge(tee, broker_url, pool, monkeypatch):
    real = async_client.open_broker

    def opening(url: str) -> BrokerAdapter:
        broker = real(url)
        monkeypatch.setattr(broker, "publish_control", never)
        return broker

    monkeypatch.setattr(async_client, "open_broker", opening)
    async with running_worker(tee, broker_url, pool):
        with pytest.raises(NoWorkerAnswered, match="did not confirm"):
            await asyncio.wait_for(AsyncClient(broker_url, pool, tee.policy(), attest_timeout=0.5).connect(), 10)


async def test_the_amqp_adapter_gives_up_on_a_confirm_that_never_comes(rabbitmq_url, pool):
    broker = AmqpBroker(rabbitmq_url, confirm_timeout=0.5)
    await broker.connect()
    try:
        await broker.declare_pool(pool)
        underlay = await broker._publish_channel.get_underlay_channel()

        async def swallowed(frame) -> None:  # RabbitMQ routes the message; its confirm never arrives
            return None

        underlay._on_confirm_frame = swallowed
        with pytest.raises(PublishTimeout, match="did not confirm") as timed_out:
            await asyncio.wait_for(broker.publish_job(pool, Message(body=b"x")), 10)
        assert isinstance(timed_out.value, BrokerUnavailable)  # it may or may not have been accepted
        with pytest.raises(ValueError):
            AmqpBroker(rabbitmq_url, confirm_timeout=0)
    finally:
        await broker.close()


async def test_enclaveq_attest_forget_epoch_forgets_only_that_pools_remembered_epoch(tee, memory_url, pool, tmp_path,
                                                                                    enclaveq_home):
    remembered = EpochMarks(enclaveq_home / "epochs.json")
    remembered.observe(pool, 7)
    remembered.observe("another-pool", 3)
    policy = write_policy(tmp_path / "policy.toml", tee.policy())
    async with running_worker(tee, memory_url, pool):
        result = await asyncio.to_thread(CliRunner().invoke, cli, [
            "attest", "--broker", memory_url, "--pool", pool, "--policy", str(policy), "--forget-epoch"])
    assert result.exit_code == 0, result.output
    assert EpochMarks(enclaveq_home / "epochs.json").newest(pool) is None
    assert EpochMarks(enclaveq_home / "epochs.json").newest("another-pool").epoch == 3
