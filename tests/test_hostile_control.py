"""A hostile broker on the control channel: what forged, replayed and oversized control messages
may cost a worker (issue 9, items 3, 4, 6 and 7).

Costs are counted, never timed: pieces of TEE evidence produced (a counting evidence provider
wraps each worker's), catch-ups started, answers published, tasks and memories kept.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from broker_adapters import Message, open_broker
from enclave_worker import membership as membership_module
from enclave_worker.attester import EVIDENCE_BURST, EVIDENCE_PER_SECOND
from enclave_worker.budget import BoundedMemory, QuietLog, TokenBucket
from enclave_worker.errors import WorkerStartupError
from enclave_worker.platform import sim_identity
from enclave_worker.rotation import MAX_REMEMBERED_ANNOUNCEMENTS
from enclave_worker.worker import Worker
from producer_sdk import AsyncClient
from protocol import crypto
from protocol.codec import pack
from protocol.envelope import encode_envelope, peek_request
from protocol.handshake import (Challenge, ControlError, EpochAnnounce, JoinRequest, JoinResponse, Statement,
                                control_kind, join_info, rotation_nonce)

from .support import SimTEE, mlp_model, wait_until

X = {"x": np.ones((1, 4), np.float32), "bias": np.zeros(3, np.float32)}


# -- counting what a worker does --------------------------------------------------------------------


class CountingProvider:
    """The simulated TEE, counting every piece of evidence it is asked for."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.platform = inner.platform
        self._lock = threading.Lock()
        self.count = 0

    def evidence(self, report_data: bytes) -> bytes:
        with self._lock:
            self.count += 1
        return self._inner.evidence(report_data)


def counted_worker(tee: SimTEE, url: str, pool: str, state_dir: Path, **kwargs) -> tuple[Worker, CountingProvider]:
    identity = sim_identity(tee.dir)
    provider = CountingProvider(identity.provider)
    worker = Worker(broker_url=url, pool=pool, identity=dataclasses.replace(identity, provider=provider),
                    state_dir=state_dir, **kwargs)
    return worker, provider


class Workers:
    """Counted workers on one pool, stopped at the end."""

    def __init__(self, tee: SimTEE, url: str, pool: str, tmp_path: Path) -> None:
        self.tee, self.url, self.pool, self.tmp_path = tee, url, pool, tmp_path
        self.started: list[Worker] = []
        self.providers: list[CountingProvider] = []

    def make(self, label: str, **kwargs) -> tuple[Worker, CountingProvider]:
        worker, provider = counted_worker(self.tee, self.url, self.pool, self.tmp_path / label, worker_id=label,
                                          **kwargs)
        self.providers.append(provider)
        return worker, provider

    async def start(self, label: str, **kwargs) -> Worker:
        worker, _ = self.make(label, **kwargs)
        await worker.start()
        self.started.append(worker)
        return worker

    def evidence(self) -> int:
        """Pieces of evidence produced so far by every worker made here."""
        return sum(p.count for p in self.providers)

    async def stop(self) -> None:
        for worker in reversed(self.started):
            await worker.stop()


@pytest.fixture
async def workers(tee, memory_url, pool, tmp_path):
    started = Workers(tee, memory_url, pool, tmp_path)
    yield started
    await started.stop()


@pytest.fixture
def slow_catch_ups(monkeypatch):
    """Catch-ups an hour apart (after the burst): a test that counts them never depends on how
    fast this machine is."""
    monkeypatch.setattr(membership_module, "CATCH_UP_MIN_INTERVAL_SECONDS", 3600.0)


class Inbox:
    """A reply queue of the attacker's, on its own broker connection: what workers answer."""

    def __init__(self, broker, address: str) -> None:
        self.broker, self.address = broker, address
        self.bodies: list[bytes] = []

    def kinds(self) -> list[str]:
        return [control_kind(b) for b in self.bodies]

    def errors(self, code: str) -> int:
        return sum(1 for b in self.bodies if control_kind(b) == "control_error" and ControlError.from_bytes(b).code == code)


async def open_inbox(broker) -> Inbox:
    name = f"attacker-{os.urandom(6).hex()}"
    inbox = Inbox(broker, await broker.declare_reply_queue(name))

    async def keep(delivery):
        inbox.bodies.append(delivery.message.body)
        await delivery.ack()

    await broker.consume_replies(name, keep)
    return inbox


async def spy_on_control(broker, pool: str, kind: str) -> list[bytes]:
    """Every control message of ``kind`` the pool broadcasts, as the broker sees it."""
    seen: list[bytes] = []

    async def keep(delivery):
        if control_kind(delivery.message.body) == kind:
            seen.append(delivery.message.body)
        await delivery.ack()

    await broker.consume_control(pool, keep)
    return seen


def requests_handled(worker: Worker, kind: str) -> float:
    return sum(sample.value for metric in worker.metrics.registry.collect() for sample in metric.samples
               if sample.name == "enclaveq_worker_requests_total" and sample.labels.get("kind") == kind)


# -- budgets ----------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_token_bucket_allows_its_burst_then_its_rate_and_a_clock_going_back_adds_nothing():
    clock = FakeClock()
    bucket = TokenBucket(rate=20, burst=32, clock=clock)
    assert sum(bucket.try_take() for _ in range(100)) == 32
    clock.now += 0.5
    assert sum(bucket.try_take() for _ in range(100)) == 10
    clock.now -= 30  # a clock that jumps back refills nothing
    assert not bucket.try_take()
    clock.now += 3600  # a long quiet spell refills the burst, never more
    assert sum(bucket.try_take() for _ in range(100)) == 32


def test_lines_a_flood_can_cause_are_logged_within_a_budget_and_the_rest_are_counted(caplog):
    now = [0.0]
    quiet = QuietLog(logging.getLogger("enclaveq.test-quiet"), rate=1.0, burst=3, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="enclaveq.test-quiet"):
        for i in range(1000):
            quiet.warning("dead-lettering request %d", i)
        assert len(caplog.records) == 3 and quiet.suppressed == 997
        now[0] += 1.0
        quiet.warning("dead-lettering request %d", 1000)
    assert len(caplog.records) == 4
    assert caplog.records[-1].getMessage() == "dead-lettering request 1000 (and 997 similar lines left out)"
    assert quiet.suppressed == 0


def test_a_model_failing_on_every_job_writes_a_traceback_for_a_few_of_them_only(caplog):
    quiet = QuietLog(logging.getLogger("enclaveq.test-quiet"), rate=1.0, burst=3, clock=lambda: 0.0)
    with caplog.at_level(logging.ERROR, logger="enclaveq.test-quiet"):
        for i in range(100):
            try:
                raise RuntimeError("the model failed")
            except RuntimeError:
                quiet.exception("internal error on job %d (RuntimeError)", i)
    assert len(caplog.records) == 3 and all(r.exc_info for r in caplog.records)
    assert quiet.suppressed == 97


def test_a_bounded_memory_forgets_the_oldest_entry_first():
    memory: BoundedMemory[int, bool] = BoundedMemory(3)
    for i in range(10):
        memory.put(i, True)
    assert len(memory) == 3 and 6 not in memory and all(i in memory for i in (7, 8, 9))


async def test_a_flood_of_challenges_gets_evidence_within_the_budget_and_busy_answers_beyond_it(workers, memory_url,
                                                                                                 pool):
    clock = FakeClock()
    await workers.start("a", monotonic=clock)  # the evidence budget runs on it
    before = workers.evidence()
    async with open_broker(memory_url) as attacker:
        inbox = await open_inbox(attacker)

        async def flood(n: int) -> None:
            for _ in range(n):
                await attacker.publish_control(pool, Message(body=Challenge(nonce=os.urandom(32)).to_bytes(),
                                                             reply_to=inbox.address))

        await flood(100)
        await wait_until(lambda: len(inbox.bodies) == 100, "an answer to every challenge")
        assert inbox.kinds().count("evidence") == EVIDENCE_BURST
        assert inbox.errors("busy") == 100 - EVIDENCE_BURST
        assert workers.evidence() - before == EVIDENCE_BURST
        clock.now += 1.0  # one second later: the sustained rate again
        await flood(100)
        await wait_until(lambda: len(inbox.bodies) == 200, "an answer to every challenge")
        assert inbox.kinds().count("evidence") == EVIDENCE_BURST + EVIDENCE_PER_SECOND
        assert workers.evidence() - before == EVIDENCE_BURST + EVIDENCE_PER_SECOND
    clock.now += 1.0
    async with AsyncClient(memory_url, pool, workers.tee.policy(), timeout=30) as client:  # still serving
        model_id = await client.upload_model(mlp_model())
        assert set(await client.run(model_id, X)) == {"logits", "label"}


async def test_a_replayed_join_request_is_answered_once(workers, memory_url, pool):
    member = await workers.start("member")
    async with open_broker(memory_url) as attacker:
        requests = await spy_on_control(attacker, pool, "join_request")
        await workers.start("joiner")
        assert requests, "the joiner's request was broadcast"
        inbox = await open_inbox(attacker)
        before = workers.evidence()
        for _ in range(20):
            await attacker.publish_control(pool, Message(body=requests[-1], reply_to=inbox.address))
        # A fresh request after them is answered, by both members: the replays were handled by then.
        fresh = await fresh_join_request(workers.tee, pool)
        await attacker.publish_control(pool, Message(body=fresh, reply_to=inbox.address))
        await wait_until(lambda: len(inbox.bodies) >= 2, "the fresh request is answered")
        assert inbox.kinds() == ["join_response", "join_response"]  # and none of the replays
        assert workers.evidence() - before == 2
        assert len(member._membership._answered) <= membership_module.MAX_ANSWERED_JOIN_NONCES


async def fresh_join_request(tee: SimTEE, pool: str) -> bytes:
    identity = sim_identity(tee.dir)
    st = Statement(pool=pool, epoch=0, suite=crypto.SUITE_ID, pool_public_key=bytes(32),
                   worker_identity_key=crypto.public_bytes(crypto.generate_private_key()), nonce=os.urandom(32),
                   config_digest=identity.config_digest)
    return JoinRequest(platform=identity.provider.platform, evidence=identity.provider.evidence(st.report_data()),
                       statement=st, worker_id="returning").to_bytes()


# -- item 4: one pool_rotate, one rotation ----------------------------------------------------------


async def test_one_pool_rotate_handed_to_two_members_rotates_the_pool_once(tee, broker_url, pool, tmp_path):
    a, b = tee.worker(broker_url, pool, state_dir=tmp_path / "a"), tee.worker(broker_url, pool, state_dir=tmp_path / "b")
    await a.start()
    try:
        await b.start()
        try:
            async with AsyncClient(broker_url, pool, tee.policy(), timeout=30) as client:
                request = client._core.pool_rotate(5, timeout=60)
                # The broker delivers the producer's one request twice: once to each member.
                for _ in range(2):
                    await client._broker.publish_job(pool, Message(body=request.body, correlation_id=request.job_id,
                                                                   reply_to=client._core.reply_to))
                await wait_until(lambda: requests_handled(a, "pool_rotate") + requests_handled(b, "pool_rotate") == 2,
                                 "both deliveries are handled")
                if broker_url.startswith("memory"):  # round robin: one each
                    assert requests_handled(a, "pool_rotate") == requests_handled(b, "pool_rotate") == 1
                await wait_until(lambda: a.keys.epoch == b.keys.epoch == 2, "both members are at epoch 2")
                assert a.pool_public_key == b.pool_public_key
        finally:
            await b.stop()
    finally:
        await a.stop()


async def test_concurrent_rotation_requests_from_one_epoch_rotate_once_and_all_answer_the_new_epoch(workers):
    a, b = await workers.start("a"), await workers.start("b")
    answers = await asyncio.gather(a._rotation.rotate_on_request(5, from_epoch=1),
                                   b._rotation.rotate_on_request(5, from_epoch=1),
                                   a._rotation.rotate_on_request(5, from_epoch=1))
    assert [epoch for epoch, _ in answers] == [2, 2, 2]
    assert len({retire for _, retire in answers}) == 1  # the one rotation's retirement time, everywhere
    await wait_until(lambda: a.keys.epoch == b.keys.epoch == 2, "both members are at epoch 2")
    assert a.pool_public_key == b.pool_public_key


# -- item 6: announcements and future epochs --------------------------------------------------------


def forged_announce(pool: str, *, epoch: int, evidence: bytes, sealed: bytes = b"\x00" * 80,
                    config_digest: bytes = bytes(32), platform: str = "sim", retire_at_ms: int = 1) -> EpochAnnounce:
    st = Statement(pool=pool, epoch=epoch, suite=crypto.SUITE_ID,
                   pool_public_key=crypto.public_bytes(crypto.generate_private_key()),
                   worker_identity_key=crypto.public_bytes(crypto.generate_private_key()),
                   nonce=rotation_nonce(pool, epoch, epoch - 1, retire_at_ms, sealed), config_digest=config_digest)
    return EpochAnnounce(platform=platform, evidence=evidence, statement=st, previous_epoch=epoch - 1,
                         retire_at_ms=retire_at_ms, sealed_key=sealed, worker_id="rotator")


async def test_a_flood_of_forged_epoch_announcements_starts_no_catch_up_and_keeps_no_state(workers, memory_url, pool):
    await workers.start("member")
    victim = await workers.start("victim")
    seen = count_calls(victim._rotation, "on_announce")
    before = workers.evidence()
    async with open_broker(memory_url) as attacker:
        replayed = forged_announce(pool, epoch=7, evidence=b"not evidence").to_bytes()
        for i in range(100):  # distinct forgeries, and one forgery replayed
            forged = forged_announce(pool, epoch=5 + i, evidence=os.urandom(64)).to_bytes()
            await attacker.publish_control(pool, Message(body=forged))
            await attacker.publish_control(pool, Message(body=replayed))
        await wait_until(lambda: len(seen) == 200, "every announcement is handled")
    await wait_until(lambda: not catching_up(victim), "no catch-up in flight")
    assert workers.evidence() == before  # not one piece of evidence anywhere
    assert victim.keys.epoch == 1
    assert len(victim._rotation._tasks) <= 2  # the eraser (and a scheduler), nothing per message
    assert len(victim._rotation._announcements) <= MAX_REMEMBERED_ANNOUNCEMENTS


async def test_a_replayed_verified_announcement_of_skipped_epochs_costs_one_catch_up(workers, memory_url, pool,
                                                                                     slow_catch_ups):
    member = await workers.start("member")
    victim = await workers.start("victim")
    seen: list[None] = []
    count_calls(victim._rotation, "on_announce", seen)
    count_calls(member._rotation, "on_announce", seen)
    identity = sim_identity(workers.tee.dir)
    sealed = b"\x00" * 80
    st_shape = forged_announce(pool, epoch=3, evidence=b"", sealed=sealed, config_digest=identity.config_digest,
                               platform=identity.provider.platform)
    # What a member that rotated twice while the victim missed both announcements would send.
    genuine = dataclasses.replace(st_shape, evidence=identity.provider.evidence(st_shape.statement.report_data()))
    before = workers.evidence()
    async with open_broker(memory_url) as attacker:
        for _ in range(100):
            await attacker.publish_control(pool, Message(body=genuine.to_bytes()))
        await wait_until(lambda: len(seen) == 200, "every announcement is handled, by both workers")
    await wait_until(lambda: not catching_up(victim) and not catching_up(member), "the catch-ups are over")
    # Each worker heard of epochs it missed and asked: a join request and the other's answer each
    # time, at most a burst of catch-ups per worker, however many announcements came.
    burst = membership_module.CATCH_UP_BURST
    assert workers.evidence() - before <= 2 * 2 * burst
    assert 1 <= victim._membership.catch_ups <= burst and 1 <= member._membership.catch_ups <= burst
    assert len(victim._rotation._tasks) <= 2


async def test_a_flood_of_jobs_claiming_a_future_epoch_costs_one_catch_up(workers, memory_url, pool, slow_catch_ups):
    member = await workers.start("member")
    victim = await workers.start("victim")
    calls: list[None] = []
    count_calls(victim._membership, "catch_up", calls)
    count_calls(member._membership, "catch_up", calls)
    async with AsyncClient(memory_url, pool, workers.tee.policy(), timeout=30) as client:
        before = workers.evidence()
        for i in range(100):
            sealed, header = peek_request(client._core.job("0" * 64, X, timeout=60).body)
            forged = dataclasses.replace(header, epoch=99, job_id=f"future-{i}")  # the clear header is not authenticated
            await client._broker.publish_job(pool, Message(body=encode_envelope(forged.to_bytes(), sealed.nonce,
                                                                                sealed.ciphertext)))
        await wait_until(lambda: len(calls) >= 100, "every forged job asked for a catch-up")
        await wait_until(lambda: not catching_up(victim) and not catching_up(member), "the catch-ups are over")
        # Both workers took a share of the jobs: at most a burst of catch-ups each, a request and
        # an answer each time.
        burst = membership_module.CATCH_UP_BURST
        assert workers.evidence() - before <= 2 * 2 * burst
        assert victim._membership.catch_ups <= burst and member._membership.catch_ups <= burst


def count_calls(obj, name: str, calls: list[None] | None = None) -> list[None]:
    """Wrap the coroutine method ``name`` of ``obj``; each call appends to the returned list."""
    calls = [] if calls is None else calls
    original = getattr(obj, name)

    async def counted(*args, **kwargs):
        calls.append(None)
        return await original(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


def catching_up(worker: Worker) -> bool:
    task = worker._membership._catching_up
    return task is not None and not task.done()


async def test_catch_ups_come_in_a_burst_of_two_at_most_then_one_per_interval(workers, monkeypatch):
    monkeypatch.setattr(membership_module, "JOIN_WAIT_SECONDS", 0.1)  # a lone worker: nobody answers
    clock = FakeClock()
    worker = await workers.start("a", monotonic=clock)  # the catch-up budget runs on it
    for _ in range(5):
        await worker._membership.catch_up()
    assert worker._membership.catch_ups == membership_module.CATCH_UP_BURST == 2
    clock.now += membership_module.CATCH_UP_MIN_INTERVAL_SECONDS - 0.1
    await worker._membership.catch_up()
    assert worker._membership.catch_ups == 2
    clock.now += 0.2
    for _ in range(5):
        await worker._membership.catch_up()
    assert worker._membership.catch_ups == 3


# -- item 3: oversized control messages -------------------------------------------------------------


async def test_an_oversized_control_message_that_is_no_sealed_request_is_dropped_unread(workers, memory_url, pool):
    worker = await workers.start("a")
    async with open_broker(memory_url) as attacker:
        inbox = await open_inbox(attacker)
        bomb = b"\x91" * (4 * 1024 * 1024) + b"\x90"  # 4 MiB of nested one-element arrays
        padded = pack({"v": 1, "t": "challenge", "nonce": os.urandom(32), "pad": bytes(2 * 1024 * 1024)})
        for body in (bomb, padded):
            await attacker.publish_control(pool, Message(body=body, reply_to=inbox.address))
        await wait_until(lambda: worker._control.dropped_oversized == 2, "both are dropped")
        # A small challenge after them is answered: the worker serves on, and answered nothing else.
        await attacker.publish_control(pool, Message(body=Challenge(nonce=os.urandom(32)).to_bytes(),
                                                     reply_to=inbox.address))
        await wait_until(lambda: len(inbox.bodies) >= 1, "the challenge is answered")
        assert inbox.kinds() == ["evidence"]
    # Operators see the flood in the metrics, not in the logs.
    assert worker.metrics.registry.get_sample_value("enclaveq_worker_refused_messages_total",
                                                    {"reason": "control_oversized"}) == 2


async def test_an_upload_whose_chunks_are_larger_than_any_clear_message_still_reaches_every_worker(workers,
                                                                                                     memory_url, pool):
    from enclave_worker.control import CLEAR_CONTROL_MAX_BYTES

    a, b = await workers.start("a"), await workers.start("b")
    model = large_model(CLEAR_CONTROL_MAX_BYTES + 1024 * 1024)
    async with AsyncClient(memory_url, pool, workers.tee.policy(), timeout=60) as client:
        model_id = await client.upload_model(model)
        await wait_until(lambda: model_id in {m.model_id for m in a.models.list()} and
                         model_id in {m.model_id for m in b.models.list()}, "both workers have the model")
    assert a._control.dropped_oversized == b._control.dropped_oversized == 0


def large_model(size: int) -> bytes:
    """An ONNX model of at least ``size`` bytes: y = x + c, with a large constant c."""
    from onnx import TensorProto, helper

    n = size // 4 + 1
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])], "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
        initializer=[helper.make_tensor("c", TensorProto.FLOAT, [n], np.zeros(n, np.float32).tobytes(), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


# -- item 7: forged answers to a joiner -------------------------------------------------------------


async def hold_answers_until(member: Worker, event: asyncio.Event) -> None:
    """The member answers join requests only once ``event`` is set: the forgery arrives first."""
    answer = member._membership.answer_join

    async def held(request):
        await event.wait()
        return await answer(request)

    member._membership.answer_join = held


def forged_response(tee: SimTEE, member: Worker, request: JoinRequest, sealed_payload: bytes) -> bytes:
    """The member's genuine evidence for this request, with a sealed blob of the attacker's:
    the evidence vouches for the statement, and anyone can seal to the joiner's identity key."""
    st = member.statement(request.statement.nonce)
    evidence = member.identity.provider.evidence(st.report_data())
    joiner_key = request.statement.worker_identity_key
    sealed = crypto.hpke_seal(sealed_payload, joiner_key, join_info(st.pool, st.epoch, st.nonce, joiner_key))
    return JoinResponse(platform=member.identity.provider.platform, evidence=evidence, statement=st,
                        sealed_keys=sealed, worker_id=member.worker_id).to_bytes()


async def forge_answers_to_joins(broker, pool: str, make_answer) -> asyncio.Event:
    """Answer every join request on the pool's control channel with ``make_answer(request)``
    before any member does; the returned event is set once a forgery went out."""
    sent = asyncio.Event()

    async def forge(delivery):
        body = delivery.message.body
        if control_kind(body) == "join_request":
            request = JoinRequest.from_bytes(body)
            await broker.publish_reply(delivery.message.reply_to, Message(body=make_answer(request)))
            sent.set()
        await delivery.ack()

    await broker.consume_control(pool, forge)
    return sent


@pytest.mark.parametrize("payload", [
    pytest.param(lambda st: pack({"epoch": st.epoch, "pool_private_key": b"\x01" * 5}), id="short-key"),
    pytest.param(lambda st: pack({"epoch": st.epoch, "pool_private_key": b"\x01" * 33}), id="long-key"),
    pytest.param(lambda st: pack({"epoch": st.epoch, "pool_private_key": 7}), id="not-bytes"),
    pytest.param(lambda st: b"\xc1 not msgpack", id="junk"),
])
async def test_a_forged_join_response_with_a_malformed_sealed_key_is_ignored_and_the_genuine_one_taken(
        workers, memory_url, pool, caplog, payload):
    member = await workers.start("member")
    async with open_broker(memory_url) as attacker:
        sent = await forge_answers_to_joins(attacker, pool, lambda request: forged_response(
            workers.tee, member, request, payload(member.statement(request.statement.nonce))))
        await hold_answers_until(member, sent)
        with caplog.at_level(logging.WARNING, logger="enclaveq.worker"):
            joiner = await workers.start("joiner")
    assert joiner.pool_public_key == member.pool_public_key
    assert "ignoring a join response that does not verify" in caplog.text


async def test_a_forged_refusal_does_not_end_a_joiner_that_a_member_admits(workers, memory_url, pool):
    member = await workers.start("member")
    async with open_broker(memory_url) as attacker:
        refusal = ControlError(code="not_admitted", message="forged: you are not welcome").to_bytes()
        sent = await forge_answers_to_joins(attacker, pool, lambda request: refusal)
        await hold_answers_until(member, sent)
        joiner = await workers.start("joiner")
    assert joiner.pool_public_key == member.pool_public_key and joiner.consuming


async def test_a_worker_that_hears_only_refusals_never_founds_and_gives_up_naming_the_refusal(
        workers, memory_url, pool, monkeypatch):
    monkeypatch.setattr(membership_module, "JOIN_TIMEOUT_SECONDS", 3.0)
    async with open_broker(memory_url) as attacker:
        await attacker.declare_pool(pool)
        refusal = ControlError(code="not_admitted", message="forged: you are not welcome").to_bytes()
        await forge_answers_to_joins(attacker, pool, lambda request: refusal)
        worker, _ = workers.make("lonely")
        with pytest.raises(WorkerStartupError, match="refuses to admit this worker: forged: you are not welcome"):
            await worker.start()
    assert worker.keys is None and not worker.consuming
    assert not (workers.tmp_path / "lonely" / pool / "pool.sealed").exists()
