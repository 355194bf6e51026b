"""Pipelines from the SDK (issue 11): the producer core seals the new requests, publishers send
events fire-and-forget, recipients read results sealed to their key -- and only theirs, once each.

The end-to-end tests run a simulated worker and a pipeline of two tiny models made with
onnx.helper (an MLP, then a softmax over its logits), and compare what recipients receive with
running the same two models directly with onnxruntime.
"""

from __future__ import annotations

import asyncio
import re
import dataclasses
import stat
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper

from attestation.policy import Policy
from enclave_worker.errors import JobRejected
from broker_adapters import open_broker
from broker_adapters.errors import PublishFailed
from producer_sdk import (
    AsyncClient, AsyncEventPublisher, AsyncResultSubscriber, Client, EventPublisher, ResultSubscriber,
)
from producer_sdk.core import ProducerCore, inbox_name
from producer_sdk.errors import (
    BadInput, BrokerUnreachable, JobTimeout, EventTopicError, InboxNotFound, NotOwner, PipelineRejected,
    UnknownPipeline,
)
from producer_sdk import events as events_module
from producer_sdk.events import _event_topic, topic_matches
from producer_sdk.results import (
    generate_recipient_key, load_recipient_key, recipient_public_key, save_recipient_key,
)
from protocol import bodies, crypto
from protocol.envelope import open_request, peek_request
from protocol.errors import KeyFileError, MalformedMessage
from protocol.handshake import Challenge, EvidenceResponse, Statement
from protocol.ownership import generate_signing_key, public_key_bytes
from protocol.pipeline import load_pipeline_toml, sign_pipeline, sign_pipeline_delete
from protocol.results import PipelineResult, seal_result_for_recipients
from protocol.routing import Route

from .support import batch_of, mlp_model, run_directly, running_worker, wait_until

RESULT_TIMEOUT = 30.0


# --------------------------------------------------------------------------- a two-stage pipeline


def softmax_model() -> bytes:
    """logits[n,3] float32 -> p = softmax(logits) over the last axis."""
    graph = helper.make_graph([helper.make_node("Softmax", ["logits"], ["p"], axis=-1)], "softmax",
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def run_chain(event: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the pipeline computes for one event, run directly with onnxruntime."""
    first = run_directly(mlp_model(), event)
    second = run_directly(softmax_model(), {"logits": first["logits"]})
    return {"label": first["label"], "probabilities": second["p"]}


def write_pipeline(directory: Path, *, name: str, topics: str, recipients: list[bytes],
                   stage2_input: str = "mlp.logits", source: str | None = None) -> Path:
    """A pipeline.toml next to its two model files: events {x, bias} -> MLP -> softmax."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mlp.onnx").write_bytes(mlp_model())
    (directory / "softmax.onnx").write_bytes(softmax_model())
    keys = ", ".join(f'"{k.hex()}"' for k in recipients)
    path = directory / "pipeline.toml"
    path.write_text(f"""
[pipeline]
name = "{name}"
description = "MLP, then softmax over its logits"

[source]
topic = "{source or f'{topics}/+/readings'}"

[[stage]]
name = "mlp"
model = "mlp.onnx"
inputs = {{ x = "event.x", bias = "event.bias" }}

[[stage]]
name = "softmax"
model = "softmax.onnx"
inputs = {{ logits = "{stage2_input}" }}

[result]
outputs = {{ label = "mlp.label", probabilities = "softmax.p" }}

[sink]
topic = "{topics}/results"

[access]
recipients = [{keys}]
""")
    return path


@dataclasses.dataclass
class Deployment:
    """A worker serving the test's pool; what the test creates is removed from the broker after."""

    url: str
    pool: str
    policy: Policy
    root: Path
    topics: str  # a topic prefix of this test alone (the brokers are shared)
    worker: object = None
    created: list[tuple[str, list[bytes]]] = dataclasses.field(default_factory=list)

    async def create(self, recipients: list[bytes], *, name: str = "chain", owner: Ed25519PrivateKey | None = None,
                     **options: str) -> str:
        path = write_pipeline(self.root / name, name=name, topics=self.topics, recipients=recipients, **options)
        async with AsyncClient(self.url, self.pool, self.policy) as client:
            pipeline_id = await client.create_pipeline(path, owner_key=owner)
        self.created.append((pipeline_id, recipients))
        return pipeline_id

    def publisher(self, pipeline_id: str, **options: object) -> AsyncEventPublisher:
        options.setdefault("topic", f"{self.topics}/device-1/readings")
        return AsyncEventPublisher(self.url, self.pool, self.policy, pipeline_id, **options)  # type: ignore[arg-type]

    def subscriber(self, pipeline_id: str, key: object) -> AsyncResultSubscriber:
        return AsyncResultSubscriber(self.url, self.pool, self.policy, pipeline_id, key)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def deployed(tee, url: str, pool: str, topics: str, root: Path) -> AsyncIterator[Deployment]:
    deployment = Deployment(url, pool, tee.policy(), root, topics=topics)
    async with running_worker(tee, url, pool) as worker:
        deployment.worker = worker
        yield deployment
    async with open_broker(url) as broker:
        for pipeline_id, recipients in deployment.created:
            for recipient in recipients:
                await broker.delete_inbox(inbox_name(pool, pipeline_id, recipient))
            await broker.delete_stream(pool, pipeline_id)


@pytest.fixture
async def deployment(tee, broker_url, pool, unique_name, tmp_path) -> AsyncIterator[Deployment]:
    """On the in-process broker, on RabbitMQ and on Mosquitto."""
    async with deployed(tee, broker_url, pool, unique_name, tmp_path) as deployment:
        yield deployment


@pytest.fixture
async def memory_deployment(tee, memory_url, pool, unique_name, tmp_path) -> AsyncIterator[Deployment]:
    """On the in-process broker only: behaviour that does not depend on the broker."""
    async with deployed(tee, memory_url, pool, unique_name, tmp_path) as deployment:
        yield deployment


@pytest.fixture
def alice():
    return generate_recipient_key()


@pytest.fixture
def bob():
    return generate_recipient_key()


def public(key) -> bytes:
    return recipient_public_key(key)


def assert_result_is_the_chain_of(result: PipelineResult, event: dict[str, np.ndarray]) -> None:
    expected = run_chain(event)
    assert set(result.outputs) == set(expected)
    np.testing.assert_array_equal(result.outputs["label"], expected["label"])
    np.testing.assert_allclose(result.outputs["probabilities"], expected["probabilities"], rtol=1e-6)


# --------------------------------------------------------------------------- the core (no worker)


POOL = "unit-pool"


@pytest.fixture
def sealing():
    """A producer core with a session (an answer a fake verifier accepts) and the pool key that opens it."""
    pool_key = crypto.generate_private_key()
    core = ProducerCore(pool=POOL, policy=None, reply_to="reply-queue", verifier=lambda *a, **k: object())
    correlation_id, challenge = core.challenge()
    statement = Statement(pool=POOL, epoch=3, suite=crypto.SUITE_ID, pool_public_key=crypto.public_bytes(pool_key),
                          worker_identity_key=b"i" * 32, nonce=Challenge.from_bytes(challenge).nonce,
                          config_digest=b"d" * 32)
    core.accept_evidence(correlation_id, EvidenceResponse(platform="sim", evidence=b"e" * 64, statement=statement,
                                                          worker_id="w").to_bytes())

    def open_(body: bytes):
        sealed, header = peek_request(body)
        session = core.session
        key = crypto.open_session_key(session.sealed_session, pool_key, pool=POOL, epoch=3,
                                      session_id=session.session_id)
        return header, open_request(sealed, header, key)

    return core, open_


def a_spec(tmp_path: Path, recipients: list[bytes]):
    spec, _ = load_pipeline_toml(write_pipeline(tmp_path / "p", name="chain", topics="unit", recipients=recipients))
    return spec


def test_pipeline_requests_are_sealed_to_the_session_and_travel_on_their_routes(sealing, tmp_path):
    core, open_ = sealing
    owner = generate_signing_key()
    signed = sign_pipeline(a_spec(tmp_path, [public(generate_recipient_key())]), owner, 1000)
    order = sign_pipeline_delete(signed.pipeline_id, owner, 2000)

    put = core.pipeline_put(signed, timeout=10)
    header, plaintext = open_(put.body)
    assert (put.route, put.topic, header.kind, header.content_type) == (Route.BROADCAST, None, "pipeline_put",
                                                                        bodies.PIPELINE)
    assert plaintext == signed.to_bytes()

    delete = core.pipeline_delete(order, timeout=10)
    header, plaintext = open_(delete.body)
    assert (delete.route, header.kind, header.content_type) == (Route.BROADCAST, "pipeline_delete",
                                                                bodies.PIPELINE_DELETE)
    assert plaintext == order.to_bytes()

    listing = core.pipeline_list(timeout=10)
    header, _ = open_(listing.body)
    assert (listing.route, header.kind) == (Route.JOBS, "pipeline_list")

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    event = core.event(signed.pipeline_id, "reading-1", {"x": x, "text": np.array(["hi"], dtype=object)},
                       topic="sensors/a/readings", timeout=10)
    header, plaintext = open_(event.body)
    assert (event.route, event.topic, header.kind, header.content_type) == (Route.STREAM, "sensors/a/readings",
                                                                            "event", bodies.EVENT)
    assert header.reply_to == "reply-queue"  # failures come back to the publisher
    pipeline_id, event_id, inputs = bodies.decode_event(plaintext)
    assert (pipeline_id, event_id) == (signed.pipeline_id, "reading-1")
    np.testing.assert_array_equal(inputs["x"], x)
    assert list(inputs["text"]) == ["hi"]


def test_an_event_sealed_again_keeps_its_event_id_under_a_new_job_id(sealing):
    core, open_ = sealing
    first = core.event("ab" * 32, "e-1", {"x": np.zeros(1, np.float32)}, topic="a/b", timeout=10)
    again = core.event("ab" * 32, "e-1", {"x": np.zeros(1, np.float32)}, topic="a/b", timeout=10)
    assert first.job_id != again.job_id
    assert bodies.decode_event(open_(first.body)[1])[1] == bodies.decode_event(open_(again.body)[1])[1] == "e-1"


@pytest.mark.parametrize("event_id", ["", ".hidden", "a/b", "x" * 65, "new\nline"])
def test_an_event_id_that_cannot_name_a_result_file_is_refused(sealing, event_id):
    core, _ = sealing
    with pytest.raises(MalformedMessage, match="event id"):
        core.event("ab" * 32, event_id, {"x": np.zeros(1)}, topic="a/b", timeout=10)


@pytest.mark.parametrize("topic_filter, topic, matches", [
    ("a/b", "a/b", True), ("a/b", "a/c", False), ("a/+/c", "a/x/c", True), ("a/+/c", "a/x/y/c", False),
    ("a/#", "a", True), ("a/#", "a/x/y", True), ("+/b", "a/b", True), ("a/+", "a", False), ("a", "a/b", False),
])
def test_topics_match_filters_as_mqtt_does(topic_filter, topic, matches):
    assert topic_matches(topic_filter, topic) is matches


def test_a_publisher_needs_one_concrete_topic_that_the_source_filter_matches():
    assert _event_topic("sensors/room-1/readings", None) == "sensors/room-1/readings"
    assert _event_topic("sensors/+/readings", "sensors/room-2/readings") == "sensors/room-2/readings"
    with pytest.raises(EventTopicError, match="wildcards"):
        _event_topic("sensors/+/readings", None)
    with pytest.raises(EventTopicError, match="does not match"):
        _event_topic("sensors/+/readings", "sensors/room-2/frames")
    with pytest.raises(EventTopicError, match="without"):
        _event_topic("sensors/#", "sensors/+")


@pytest.mark.parametrize("topic", ["sensors/room 2/readings", "sensors/$SYS/readings", "sensors/é/readings",
                                   f"sensors/{'r' * 129}/readings", "sensors//readings"])
def test_the_levels_a_producer_fills_in_under_a_wildcard_are_checked_as_a_topic(topic):
    # They match "+" as MQTT matches, but no broker adapter takes them: a typed error, not a ValueError.
    with pytest.raises(EventTopicError, match="topic levels are 1-128 characters"):
        _event_topic("sensors/+/readings", topic)


# --------------------------------------------------------------------------- recipient key files


def test_a_recipient_key_file_is_private_never_overwritten_and_loads_back(tmp_path):
    key = generate_recipient_key()
    path = tmp_path / "dashboard.key"
    save_recipient_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public(load_recipient_key(path)) == public(key) == recipient_public_key(path)
    with pytest.raises(KeyFileError, match="already exists"):
        save_recipient_key(generate_recipient_key(), path)
    assert public(load_recipient_key(path)) == public(key)


def test_recipient_public_keys_come_from_hex_key_objects_and_public_key_files(tmp_path):
    key = generate_recipient_key()
    pem = tmp_path / "dashboard.pub"
    pem.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    raw = crypto.public_bytes(key)
    assert recipient_public_key(raw.hex()) == recipient_public_key(key) == recipient_public_key(pem) == raw
    with pytest.raises(KeyFileError, match="small-order"):
        recipient_public_key("00" * 32)


def test_a_file_that_is_not_a_recipient_key_is_refused_without_quoting_it(tmp_path):
    signing = tmp_path / "owner.pem"
    signing.write_bytes(generate_signing_key().private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    garbage = tmp_path / "garbage.key"
    garbage.write_text("SECRET-MATERIAL-1234")
    for path in (signing, garbage):
        with pytest.raises(KeyFileError, match="not a PEM X25519") as refused:
            load_recipient_key(path)
        assert "SECRET" not in str(refused.value) and "PRIVATE KEY" not in str(refused.value)


# --------------------------------------------------------------------------- what a subscriber accepts (no worker)


def test_a_subscriber_yields_only_authentic_new_results_of_its_own_pipeline(tee, caplog):
    pool_key, alice, bob = crypto.generate_private_key(), generate_recipient_key(), generate_recipient_key()
    pipeline = "ab" * 32
    subscriber = AsyncResultSubscriber("memory://unused", POOL, tee.policy(), pipeline, alice)
    subscriber._epoch_keys[3] = crypto.public_bytes(pool_key)

    def sealed(*, to=(alice,), event="e-1", pipeline_id=pipeline, pool=POOL, epoch=3, key=pool_key) -> bytes:
        result = PipelineResult(pipeline_id=pipeline_id, event_id=event, stage_models=("cd" * 32,),
                                publisher=b"p" * 32, pool=pool, epoch=epoch, produced_ms=1,
                                outputs={"y": np.ones(2, np.float32)})
        return seal_result_for_recipients(result, [public(k) for k in to], key)

    def accept(data: bytes) -> PipelineResult | None:
        return asyncio.run(subscriber._accept(data))

    first = accept(sealed(to=(bob, alice)))
    assert first is not None and first.event_id == "e-1" and first.pipeline_id == pipeline
    assert accept(sealed()) is None and subscriber.duplicates == 1  # the same event id again

    tampered = bytearray(sealed(event="e-2"))
    tampered[-40] ^= 1
    refusals = {
        "not_recipient": sealed(to=(bob,), event="e-3"),
        "forged": bytes(tampered),
        "other_pipeline": sealed(pipeline_id="ef" * 32, event="e-4"),
        "wrong_pool": sealed(pool="another-pool", event="e-5"),
        "unknown_epoch": sealed(epoch=2, key=crypto.generate_private_key(), event="e-6"),  # older than attested
        "malformed": b"\x81\xa1v\x01",
    }
    for reason, data in refusals.items():
        assert accept(data) is None, reason
        assert subscriber.refusals[reason] == 1, reason
    # Sealed by a key that is not the attested pool's: recipient slots derive from the pool key
    # too, so the forgery has no slot alice recognises.
    assert accept(sealed(key=crypto.generate_private_key(), event="e-7")) is None
    assert subscriber.refusals["not_recipient"] == 2
    assert subscriber.received == 1 and subscriber.refused == 7
    # Refusals are logged by reason code only: nothing of the messages themselves.
    logged = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert logged and all("e-3" not in line and "another-pool" not in line for line in logged)


# --------------------------------------------------------------------------- end to end


async def test_twenty_events_through_a_two_stage_pipeline_reach_the_recipient_as_the_chain_computes_them(
        deployment, alice, bob):
    pipeline_id = await deployment.create([public(alice), public(bob)])
    events = batch_of(20)
    async with deployment.publisher(pipeline_id) as publisher, deployment.subscriber(pipeline_id, alice) as results:
        event_ids = await publisher.publish_many(events, max_in_flight=8)
        assert len(set(event_ids)) == 20
        received = {}
        for _ in range(20):
            result = await results.receive(timeout=RESULT_TIMEOUT)
            received[result.event_id] = result
        assert set(received) == set(event_ids)
        for event_id, event in zip(event_ids, events):
            result = received[event_id]
            assert_result_is_the_chain_of(result, event)
            assert result.pipeline_id == pipeline_id and result.pool == deployment.pool
            assert result.stage_models == tuple(load_pipeline_toml(deployment.root / "chain" / "pipeline.toml")[0]
                                                .model_ids)
            assert result.publisher_session is not None  # this publisher proved no producer key
        assert results.refused == 0 and results.duplicates == 0
        assert publisher.errors == []


async def test_a_subscriber_started_after_the_events_still_gets_their_results(deployment, alice):
    pipeline_id = await deployment.create([public(alice)])
    events = batch_of(5)
    async with deployment.publisher(pipeline_id) as publisher:
        event_ids = await publisher.publish_many(events)
    # Nobody was reading: the results waited in alice's inbox, declared with the pipeline.
    async with deployment.subscriber(pipeline_id, alice) as results:
        received = {}
        for _ in range(5):
            result = await results.receive(timeout=RESULT_TIMEOUT)
            received[result.event_id] = result
    assert set(received) == set(event_ids)
    for event_id, event in zip(event_ids, events):
        assert_result_is_the_chain_of(received[event_id], event)


async def test_a_result_left_unhandled_is_delivered_again_to_the_next_subscriber(memory_deployment, alice):
    deployment = memory_deployment
    pipeline_id = await deployment.create([public(alice)])
    async with deployment.publisher(pipeline_id) as publisher:
        (event_id,) = await publisher.publish_many(batch_of(1))
    with pytest.raises(RuntimeError, match="dashboard crashed"):
        async with deployment.subscriber(pipeline_id, alice) as results:
            assert (await results.receive(timeout=RESULT_TIMEOUT)).event_id == event_id
            raise RuntimeError("dashboard crashed while handling the result")
    async with deployment.subscriber(pipeline_id, alice) as results:
        assert (await results.receive(timeout=RESULT_TIMEOUT)).event_id == event_id


async def test_a_key_that_is_not_a_recipient_has_no_inbox_and_opens_nothing_in_anothers(deployment, alice, bob):
    stranger = generate_recipient_key()
    pipeline_id = await deployment.create([public(alice), public(bob)])
    with pytest.raises(InboxNotFound, match="not among its recipients"):
        async with deployment.subscriber(pipeline_id, stranger):
            pass

    # Reading bob's inbox (anyone with access to the broker can) yields nothing it can open.
    snooper = deployment.subscriber(pipeline_id, stranger)
    snooper.inbox = inbox_name(deployment.pool, pipeline_id, public(bob))
    async with snooper, deployment.publisher(pipeline_id) as publisher:
        reading = asyncio.create_task(snooper.receive())
        await publisher.publish_many(batch_of(3))
        await wait_until(lambda: snooper.refusals["not_recipient"] == 3, "three results refused as not for this key")
        assert not reading.done() and snooper.received == 0
        reading.cancel()
    # alice, a recipient, opens all three.
    async with deployment.subscriber(pipeline_id, alice) as results:
        for _ in range(3):
            await results.receive(timeout=RESULT_TIMEOUT)


async def test_a_definition_refused_by_a_worker_still_receiving_a_stage_model_is_sent_again(
        memory_deployment, alice, monkeypatch):
    """create_pipeline uploads the stage models the pool lacks; an upload goes to every worker and
    one confirmation is enough, so the worker that takes the definition may not hold a model yet
    (the one the pool listed). The client sends the definition again, briefly, instead of failing."""
    deployment = memory_deployment
    models = deployment.worker.models
    real_get = models.get
    refusals = []

    async def not_yet_once(model_id):
        if not refusals:
            refusals.append(model_id)
            raise JobRejected(f"model {model_id} is not loaded on this pool", bodies.ErrorCode.UNKNOWN_MODEL)
        return await real_get(model_id)

    monkeypatch.setattr(models, "get", not_yet_once)
    pipeline_id = await deployment.create([public(alice)])
    assert len(refusals) == 1
    async with deployment.publisher(pipeline_id) as publisher, deployment.subscriber(pipeline_id, alice) as results:
        (event_id,) = await publisher.publish_many(batch_of(1))
        assert (await results.receive(timeout=RESULT_TIMEOUT)).event_id == event_id


async def test_the_same_pipeline_on_two_pools_of_one_broker_gives_each_pools_recipient_that_pools_results(
        deployment, tee, broker_url, unique_name, tmp_path, bob):
    """A pipeline's id is its owner's and its name's, so one owner's pipeline on a staging pool and
    on a production pool of one broker has one id. Each pool must still have its own inbox: with
    one shared inbox, the staging subscriber took the production result, refused it as another
    pool's (and acknowledged it), and the production recipient never got it."""
    staging, owner = deployment, generate_signing_key()
    production_pool = f"{staging.pool}-production"
    try:
        async with deployed(tee, broker_url, production_pool, unique_name, tmp_path / "production") as production:
            pipeline_id = await staging.create([public(bob)], owner=owner)
            assert await production.create([public(bob)], owner=owner) == pipeline_id

            # Only the staging subscriber runs while production publishes: it sees the production
            # result (both inboxes take the sink topic) and refuses it as another pool's.
            async with staging.subscriber(pipeline_id, bob) as on_staging:
                reading = asyncio.create_task(on_staging.receive())
                async with production.publisher(pipeline_id) as publisher:
                    (event_id,) = await publisher.publish_many(batch_of(1))
                await wait_until(lambda: on_staging.refusals["wrong_pool"] == 1,
                                 "the staging subscriber refusing the production result")
                assert not reading.done()
                reading.cancel()

            async with production.subscriber(pipeline_id, bob) as on_production:
                assert (await on_production.receive(timeout=RESULT_TIMEOUT)).event_id == event_id
    finally:
        async with open_broker(broker_url) as broker:
            await broker.delete_pool(production_pool)


def refuse_events_after(confirmed: int, adapter: object, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The broker behind ``adapter`` (an adapter, or an adapter class: every one opened after)
    takes the first ``confirmed`` events and refuses every later one at once, as a broker that went
    away would. It confirms the ones it takes only after it refused one: publishes still in flight
    when another fails. Returns the message ids it confirmed, as it confirms them."""
    real = adapter.publish_event  # type: ignore[attr-defined]
    taken: list[str] = []
    refused = asyncio.Event()
    calls = 0

    async def publish_event(*args, **options) -> None:  # (self,) topic, message: as `real` takes them
        nonlocal calls
        calls += 1
        if calls > confirmed:
            refused.set()
            raise PublishFailed("the broker refused the event (injected)")
        await refused.wait()
        await real(*args, **options)
        taken.append(args[-1].message_id)

    monkeypatch.setattr(adapter, "publish_event", publish_event)
    return taken


async def test_a_batch_that_fails_partway_raises_as_before_and_reports_each_event_it_published(
        memory_deployment, alice, monkeypatch):
    deployment = memory_deployment
    pipeline_id = await deployment.create([public(alice)])
    events = batch_of(10)
    reported: list[tuple[int, str]] = []
    async with deployment.publisher(pipeline_id) as publisher, deployment.subscriber(pipeline_id, alice) as results:
        confirmed = refuse_events_after(3, publisher.client._broker, monkeypatch)
        # The broker's refusal comes out as it always did; the three confirmed while it was
        # raised were reported before publish_many raised it.
        with pytest.raises(BrokerUnreachable, match="refused the event"):
            await publisher.publish_many(events, max_in_flight=4,
                                         published=lambda index, event_id: reported.append((index, event_id)))
        assert len(confirmed) == 3 and len(reported) == 3
        indexes, event_ids = [index for index, _ in reported], [event_id for _, event_id in reported]
        assert sorted(indexes) == [0, 1, 2] and len(set(event_ids)) == 3  # the events in flight before the 4th
        # Each reported id is an event the recipient gets, computed from the event at that index.
        received = {}
        for _ in reported:
            result = await results.receive(timeout=RESULT_TIMEOUT)
            received[result.event_id] = result
        assert set(received) == set(event_ids)
        for index, event_id in reported:
            assert_result_is_the_chain_of(received[event_id], events[index])
        assert publisher.published == 3


async def test_a_failed_event_comes_back_to_its_publisher_as_a_typed_error_and_others_are_unaffected(
        memory_deployment, alice, monkeypatch):
    deployment = memory_deployment
    pipeline_id = await deployment.create([public(alice)])
    good = batch_of(1)[0]
    # A publisher that does not check its events first (an older SDK, or a program sealing events
    # itself): the pool refuses the bad one and says so to the publisher.
    monkeypatch.setattr(events_module, "_check_event", lambda arrays, info: None)
    async with deployment.publisher(pipeline_id) as publisher, deployment.subscriber(pipeline_id, alice) as results:
        bad_id = await publisher.publish({"x": np.zeros((2, 4), np.float32)}, event_id="missing-bias")
        good_id = await publisher.publish(good)
        await wait_until(lambda: publisher.errors, "the worker's refusal of the bad event")
        (error,) = publisher.errors
        assert isinstance(error, BadInput) and error.event_id == bad_id == "missing-bias"
        assert "bias" in str(error)
        result = await results.receive(timeout=RESULT_TIMEOUT)
        assert result.event_id == good_id
        assert_result_is_the_chain_of(result, good)


@pytest.mark.parametrize("event, says", [
    ({"x": np.zeros((2, 4), np.float32)}, "missing ['bias'], unexpected []"),
    ({"x": np.zeros((2, 4), np.float32), "bias": np.zeros((1, 3), np.float32), "y": np.zeros(1)}, "missing [], unexpected ['y']"),
    ({"x": np.zeros((2, 4), np.float64), "bias": np.zeros((1, 3), np.float32)}, "'x' must be float32, got float64"),
    ({"x": np.zeros((2, 5), np.float32), "bias": np.zeros((1, 3), np.float32)}, "input 'x' must have shape [?, 4], got [2, 5]"),
])
async def test_an_event_the_pipeline_cannot_run_is_refused_before_anything_is_sent(memory_deployment, alice,
                                                                                  event, says):
    """Publishing is fire-and-forget: the pool's typed error for an event whose inputs do not fit
    reaches only a publisher still listening when it comes back (a one-shot `enclaveq publish`
    has gone by then). So the publisher checks each event against the inputs the pool listed for
    the pipeline, and refuses a misfit at once."""
    deployment = memory_deployment
    pipeline_id = await deployment.create([public(alice)])
    async with deployment.publisher(pipeline_id) as publisher:
        assert sorted(name for name, _, _ in publisher.info.event_inputs) == ["bias", "x"]
        with pytest.raises(BadInput, match=re.escape(says)) as refused:
            await publisher.publish(event)
        assert "pipeline " in str(refused.value) and "x: float32" in str(refused.value)
        assert publisher.published == 0


async def test_the_same_event_published_twice_reaches_the_recipient_once(memory_deployment, alice):
    deployment = memory_deployment
    pipeline_id = await deployment.create([public(alice)])
    event = batch_of(1)[0]
    async with deployment.publisher(pipeline_id) as publisher, deployment.subscriber(pipeline_id, alice) as results:
        await publisher.publish(event, event_id="reading-42")
        await publisher.publish(event, event_id="reading-42")  # a device that resends after a lost confirm
        assert (await results.receive(timeout=RESULT_TIMEOUT)).event_id == "reading-42"
        second = asyncio.create_task(results.receive())
        await wait_until(lambda: results.duplicates == 1, "the second result dropped as a duplicate")
        assert not second.done()
        second.cancel()


async def test_creation_refuses_a_wiring_that_does_not_type_check_naming_the_toml_key(memory_deployment, alice):
    deployment = memory_deployment
    # The softmax takes float logits; the MLP's label is int64.
    with pytest.raises(PipelineRejected, match="stage\\[1\\].inputs.logits") as refused:
        await deployment.create([public(alice)], name="miswired", stage2_input="mlp.label")
    assert refused.value.key == "stage[1].inputs.logits"
    with pytest.raises(PipelineRejected, match="source.topic") as refused:
        await deployment.create([public(alice)], name="bad-topic", source="enclaveq/+/jobs")
    assert refused.value.key == "source.topic"
    async with AsyncClient(deployment.url, deployment.pool, deployment.policy) as client:
        assert await client.list_pipelines() == []


async def test_only_the_owner_deletes_a_pipeline_and_then_its_events_have_nowhere_to_go(memory_deployment, alice):
    deployment = memory_deployment
    owner, stranger = generate_signing_key(), generate_signing_key()
    pipeline_id = await deployment.create([public(alice)], owner=owner)
    async with AsyncClient(deployment.url, deployment.pool, deployment.policy) as client, \
            deployment.publisher(pipeline_id) as publisher:
        (listed,) = await client.list_pipelines()
        assert (listed.pipeline_id, listed.name, listed.owner) == (pipeline_id, "chain", public_key_bytes(owner).hex())
        assert listed.source == f"{deployment.topics}/+/readings" and listed.recipients == 1
        with pytest.raises(NotOwner):
            await client.delete_pipeline(pipeline_id, owner_key=stranger)
        await client.delete_pipeline(pipeline_id, owner_key=owner)
        assert await client.list_pipelines() == []
        with pytest.raises(UnknownPipeline):
            await publisher.publish(batch_of(1)[0])
    with pytest.raises(UnknownPipeline, match="has no pipeline"):
        async with deployment.publisher(pipeline_id):
            pass


async def test_replacing_a_pipeline_takes_its_owners_newer_signature(memory_deployment, alice, bob):
    deployment = memory_deployment
    owner = generate_signing_key()
    first = await deployment.create([public(alice)], owner=owner)
    again = await deployment.create([public(alice), public(bob)], owner=owner)  # same name, same owner: same id
    assert again == first
    async with AsyncClient(deployment.url, deployment.pool, deployment.policy) as client:
        (listed,) = await client.list_pipelines()
    assert listed.recipients == 2
    # bob's inbox was declared with the new definition: he reads from now on.
    async with deployment.publisher(first) as publisher, deployment.subscriber(first, bob) as results:
        (event_id,) = await publisher.publish_many(batch_of(1))
        assert (await results.receive(timeout=RESULT_TIMEOUT)).event_id == event_id


async def test_a_publisher_refuses_a_source_filter_it_cannot_publish_on(memory_deployment, alice):
    deployment = memory_deployment
    pipeline_id = await deployment.create([public(alice)])
    with pytest.raises(EventTopicError, match="wildcards"):
        async with deployment.publisher(pipeline_id, topic=None):
            pass
    with pytest.raises(EventTopicError, match="does not match"):
        async with deployment.publisher(pipeline_id, topic=f"{deployment.topics}/device-1/frames"):
            pass
    with pytest.raises(UnknownPipeline):
        async with deployment.publisher("cd" * 32):
            pass


async def test_after_a_rotation_a_stale_publisher_sends_again_and_the_recipient_follows_the_new_epoch(
        memory_deployment, alice):
    deployment = memory_deployment
    pipeline_id = await deployment.create([public(alice)])
    event = batch_of(1)[0]
    async with deployment.publisher(pipeline_id) as publisher, deployment.subscriber(pipeline_id, alice) as results, \
            AsyncClient(deployment.url, deployment.pool, deployment.policy) as operator:
        await operator.rotate_pool(grace_seconds=0)
        await wait_until(lambda: deployment.worker.keys.previous == (), "epoch 1 is erased")
        # Sealed to the erased epoch: the worker sends a stale-epoch notice, the publisher
        # re-attests and sends the event again (same event id); the result is sealed under epoch
        # 2, which the subscriber learns by attesting again.
        event_id = await publisher.publish(event)
        result = await results.receive(timeout=RESULT_TIMEOUT)
        assert (result.event_id, result.epoch) == (event_id, 2)
        assert_result_is_the_chain_of(result, event)
        assert publisher.client.statement.epoch == 2 and publisher.errors == [] and results.refused == 0


def events_answered(worker) -> float:
    return worker.metrics.registry.get_sample_value(
        "enclaveq_worker_requests_total", {"kind": "event", "outcome": "ok"}) or 0.0


async def test_a_recipient_offline_across_a_rotation_still_opens_the_results_of_the_epoch_it_attested(
        memory_deployment, alice, tmp_path):
    deployment = memory_deployment
    remembered = tmp_path / "pool-keys.json"
    pipeline_id = await deployment.create([public(alice)])
    async with AsyncResultSubscriber(deployment.url, deployment.pool, deployment.policy, pipeline_id, alice,
                                     pool_keys=remembered) as first_run:
        assert first_run.client.statement.epoch == 1
    assert stat.S_IMODE(remembered.stat().st_mode) == 0o600
    async with deployment.publisher(pipeline_id) as publisher:
        event_id = await publisher.publish(batch_of(1)[0])
    await wait_until(lambda: events_answered(deployment.worker) >= 1, "the event's result is sealed")
    async with AsyncClient(deployment.url, deployment.pool, deployment.policy) as operator:
        await operator.rotate_pool(grace_seconds=0)
    await wait_until(lambda: deployment.worker.keys.previous == (), "epoch 1 is erased")
    # Restarted: attesting now gives epoch 2 only; epoch 1's key comes from what the first run verified.
    async with AsyncResultSubscriber(deployment.url, deployment.pool, deployment.policy, pipeline_id, alice,
                                     pool_keys=remembered) as second_run:
        assert second_run.client.statement.epoch == 2
        result = await second_run.receive(timeout=RESULT_TIMEOUT)
        assert (result.event_id, result.epoch, second_run.refused) == (event_id, 1, 0)


async def test_keys_remembered_under_one_policy_are_not_trusted_under_another(memory_deployment, alice, tmp_path):
    # The epoch-1 key was verified against the first policy; a subscriber with another policy
    # (here: one that also accepts another measurement) did not verify it and must not use it.
    deployment = memory_deployment
    remembered = tmp_path / "pool-keys.json"
    pipeline_id = await deployment.create([public(alice)])
    async with AsyncResultSubscriber(deployment.url, deployment.pool, deployment.policy, pipeline_id, alice,
                                     pool_keys=remembered):
        pass
    async with deployment.publisher(pipeline_id) as publisher:
        await publisher.publish(batch_of(1)[0])
    await wait_until(lambda: events_answered(deployment.worker) >= 1, "the event's result is sealed")
    async with AsyncClient(deployment.url, deployment.pool, deployment.policy) as operator:
        await operator.rotate_pool(grace_seconds=0)
    await wait_until(lambda: deployment.worker.keys.previous == (), "epoch 1 is erased")
    other_policy = dataclasses.replace(deployment.policy,
                                       measurements=(*deployment.policy.measurements, "ab" * 32))
    async with AsyncResultSubscriber(deployment.url, deployment.pool, other_policy, pipeline_id, alice,
                                     pool_keys=remembered) as other:
        with pytest.raises(JobTimeout):
            await other.receive(timeout=1.0)
        assert other.refusals == {"unknown_epoch": 1}


async def test_a_corrupt_pool_keys_file_is_set_aside_and_refuses_nothing_it_did_not_verify(
        memory_deployment, alice, tmp_path, caplog):
    deployment = memory_deployment
    remembered = tmp_path / "pool-keys.json"
    remembered.write_text('{"version": 1, "scopes": {"x": {"pool": "p", "verified_ms": 1, "epochs": {"1": "zz"}}}}')
    pipeline_id = await deployment.create([public(alice)])
    async with AsyncResultSubscriber(deployment.url, deployment.pool, deployment.policy, pipeline_id, alice,
                                     pool_keys=remembered) as subscriber:
        assert subscriber.client.statement.epoch == 1
    assert (tmp_path / "pool-keys.json.corrupt").exists()
    assert "are unusable" in caplog.text
    assert '"1": "' in remembered.read_text()  # written again, with the key just verified


async def test_the_sync_twins_create_publish_and_read_like_the_async_ones(memory_deployment, alice, tmp_path):
    deployment = memory_deployment
    key_file = tmp_path / "alice.key"
    save_recipient_key(alice, key_file)
    path = write_pipeline(tmp_path / "sync", name="sync", topics=deployment.topics, recipients=[public(alice)])
    events = batch_of(3)

    def as_a_script() -> tuple[list[str], list[PipelineResult]]:
        with Client(deployment.url, deployment.pool, deployment.policy) as client:
            pipeline_id = client.create_pipeline(path)
            deployment.created.append((pipeline_id, [public(alice)]))
        with EventPublisher(deployment.url, deployment.pool, deployment.policy, pipeline_id,
                            topic=f"{deployment.topics}/device-9/readings") as publisher:
            event_ids = publisher.publish_many(events)
            assert publisher.errors == []
        with ResultSubscriber(deployment.url, deployment.pool, deployment.policy, pipeline_id, key_file) as results:
            return event_ids, [results.receive(timeout=RESULT_TIMEOUT) for _ in events]

    event_ids, received = await asyncio.to_thread(as_a_script)
    by_id = {r.event_id: r for r in received}
    assert set(by_id) == set(event_ids)
    for event_id, event in zip(event_ids, events):
        assert_result_is_the_chain_of(by_id[event_id], event)

