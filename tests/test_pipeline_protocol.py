"""Pipeline definitions (TOML rules, ids, owner signatures, replay ordering, stage type checks) and
pipeline results sealed to their recipients (round trip, non-recipients, tampering, forgery)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
from pathlib import Path

import msgpack
import numpy as np
import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocol import crypto
from protocol import results as results_module
from protocol.codec import pack, unpack
from protocol.errors import MalformedMessage, OversizedMessage, ProtocolError, SignatureInvalid
from protocol.ownership import DeleteOrder, generate_signing_key, public_key_bytes
from protocol.pipeline import (
    DEFINITION_KIND, DEFINITION_LABEL, DELETE_KIND, DELETE_LABEL, MAX_SIGNED_PIPELINE_BYTES, PipelineDelete,
    PipelineError, PipelineSpec, Reference, SignedPipeline, Stage, StageMappingError, UnknownStageModel, amqp_binding_key,
    check_stage_mapping, load_pipeline_toml, pipeline_id, sign_pipeline, sign_pipeline_delete,
)
from protocol.results import (
    NotARecipient, PipelineResult, ResultForged, ResultHeader, UnknownEpoch, WrongPool, generate_recipient_key,
    open_result, peek_result_header, seal_result_for_recipients,
)

OWNER, MALLORY = generate_signing_key(), generate_signing_key()
OWNER_PUB = public_key_bytes(OWNER)
ALICE, BOB, CAROL = generate_recipient_key(), generate_recipient_key(), generate_recipient_key()
ALICE_PUB, BOB_PUB, CAROL_PUB = (crypto.public_bytes(k) for k in (ALICE, BOB, CAROL))
PRODUCER_PUB = public_key_bytes(generate_signing_key())
X25519_SMALL_ORDER = bytes(32)                       # the point 0: every shared value with it is 0
ED25519_IDENTITY = b"\x01" + bytes(31)               # small order: "signatures" need no private key
MODEL_FILES = {"tokenizer.onnx": b"tokenizer graph", "minilm.onnx": b"minilm graph", "pooling.onnx": b"pooling graph"}
IDS = {name: hashlib.sha256(data).hexdigest() for name, data in MODEL_FILES.items()}
TOKENIZER, MINILM, POOLING = IDS["tokenizer.onnx"], IDS["minilm.onnx"], IDS["pooling.onnx"]

BASE = {
    "pipeline": {"name": "text-embedding", "description": "raw text -> sentence embedding"},
    "source": {"topic": "enclaveq/examples/text"},
    "stage": [
        {"name": "tokenize", "model": "tokenizer.onnx", "inputs": {"text": "event.text"}},
        {"name": "embed", "model": "minilm.onnx",
         "inputs": {"input_ids": "tokenize.input_ids", "attention_mask": "tokenize.attention_mask",
                    "token_type_ids": "tokenize.token_type_ids"}},
        {"name": "pool", "model": "pooling.onnx",
         "inputs": {"last_hidden_state": "embed.last_hidden_state", "attention_mask": "tokenize.attention_mask"}},
    ],
    "result": {"outputs": {"embedding": "pool.embedding"}},
    "sink": {"topic": "enclaveq/examples/text/embeddings"},
    "access": {"recipients": [BOB_PUB.hex(), ALICE_PUB.hex()]},
}
DELETE = object()


def write_pipeline(directory: Path, changes=(), *, text: str | None = None) -> Path:
    """BASE with ``changes`` ((path, value) pairs; DELETE removes the key) as DIR/pipeline.toml,
    beside the model files it names."""
    doc = copy.deepcopy(BASE)
    for path, value in changes:
        *parents, last = path
        node = doc
        for part in parents:
            node = node[part]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    for name, data in MODEL_FILES.items():
        (directory / name).write_bytes(data)
    target = directory / "pipeline.toml"
    target.write_text(tomli_w.dumps(doc) if text is None else text)
    return target


@pytest.fixture
def spec(tmp_path: Path) -> PipelineSpec:
    return load_pipeline_toml(write_pipeline(tmp_path))[0]


# --------------------------------------------------------------------------- the TOML


def test_a_pipeline_toml_resolves_its_model_files_to_ids_and_returns_their_bytes(tmp_path):
    spec, models = load_pipeline_toml(write_pipeline(tmp_path))
    assert models == {IDS[name]: data for name, data in MODEL_FILES.items()}
    assert spec.model_ids == (TOKENIZER, MINILM, POOLING)
    assert [s.name for s in spec.stages] == ["tokenize", "embed", "pool"]
    assert dict(spec.stages[0].inputs) == {"text": Reference("event", "text")}
    assert spec.event_inputs == ("text",)
    assert spec.outputs == (("embedding", Reference("pool", "embedding")),)
    assert (spec.source_exchange, spec.sink_exchange) == ("enclaveq.events", "enclaveq.results")
    assert spec.recipients == tuple(sorted([ALICE_PUB, BOB_PUB])) and spec.producers == ()
    assert spec.when is None and spec.description == "raw text -> sentence embedding"


def test_a_stage_model_given_as_an_id_is_kept_and_nothing_is_read_for_it(tmp_path):
    spec, models = load_pipeline_toml(write_pipeline(tmp_path, [(("stage", 1, "model"), MINILM.upper())]))
    assert spec.model_ids[1] == MINILM and MINILM not in models and len(models) == 2


def test_optional_keys_are_read_when_given(tmp_path):
    spec, _ = load_pipeline_toml(write_pipeline(tmp_path, [
        (("source", "exchange"), "sensors.in"), (("sink", "exchange"), "sensors.out"),
        (("source", "topic"), "sensors/+/text"), (("access", "producers"), [PRODUCER_PUB.hex()]),
        (("result", "outputs"), {"embedding": "pool.embedding", "echo": "event.text"}),
    ]))
    assert (spec.source_exchange, spec.sink_exchange) == ("sensors.in", "sensors.out")
    assert spec.source_binding_key == "sensors.*.text" and spec.sink_routing_key == "enclaveq.examples.text.embeddings"
    assert spec.producers == (PRODUCER_PUB,) and spec.allows(PRODUCER_PUB)
    assert not spec.allows(OWNER_PUB) and not spec.allows(None)
    assert dict(spec.outputs)["echo"] == Reference("event", "text")


def test_without_a_producer_list_any_producer_may_publish(spec):
    assert spec.allows(None) and spec.allows(PRODUCER_PUB)


ADAPTER_TOPICS = ["enclaveq/examples/text", "sensors/+/frames", "sensors/#", "a:b/c=d/e@f", "x" * 128,
                  "/".join(["a"] * 16), "enclaveq/p1/results", "enclaveq/+/text",
                  "enclaveq/p1/jobs", "enclaveq/+/+", "#", "+/+/control", "enclaveq/_probe/x", "enclaveq/reply",
                  "enclaveq/p1/rotation-lock", "enclaveq/p1/streams", "a.b", "a/*", "x" * 129, "/".join(["a"] * 17)]


@pytest.mark.parametrize("topic", ADAPTER_TOPICS)
def test_every_topic_a_definition_accepts_the_broker_adapters_accept_too(spec, topic):
    """The definition is checked at creation; the adapters check again when the worker subscribes
    and publishes. A definition must never pass the first check and fail the second."""
    from broker_adapters import _common as adapters

    for field_name, wildcards in (("source_topic", True), ("sink_topic", False)):
        other = {"source_topic": "elsewhere/in"} if field_name == "sink_topic" else {"sink_topic": "elsewhere/out"}
        try:
            dataclasses.replace(spec, **{field_name: topic, **other})
        except PipelineError:
            continue
        adapters.check_topic("pipeline", topic, wildcards=wildcards)
        assert len(adapters.amqp_binding_key(topic).encode()) <= 255


def test_every_topic_the_broker_adapters_keep_for_themselves_is_refused_as_a_source(spec):
    from broker_adapters import _common as adapters

    for internal in adapters._INTERNAL_TOPICS:
        with pytest.raises(PipelineError, match="enclaveq's own topics"):
            dataclasses.replace(spec, source_topic=internal)


def test_mqtt_filters_map_to_amqp_binding_keys():
    assert amqp_binding_key("sensors/+/frames") == "sensors.*.frames"
    assert amqp_binding_key("sensors/#") == "sensors.#"


BAD_TOMLS = [
    ("an unknown table", [(("extra",), {"a": 1})], "extra"),
    ("an unknown key", [(("pipeline", "colour"), "blue")], "pipeline.colour"),
    ("an unknown stage key", [(("stage", 0, "device"), "gpu")], "stage[0].device"),
    ("a missing table", [(("access",), DELETE)], "access"),
    ("no stages", [(("stage",), DELETE)], "stage"),
    ("a missing name", [(("pipeline", "name"), DELETE)], "pipeline.name"),
    ("a name with a space", [(("pipeline", "name"), "text embedding")], "pipeline.name"),
    ("a name too long", [(("pipeline", "name"), "n" * 65)], "pipeline.name"),
    ("a description that is not text", [(("pipeline", "description"), 3)], "pipeline.description"),
    ("a stage table that is not an array", [(("stage",), {"name": "x"})], "stage"),
    ("seventeen stages", [(("stage",), [BASE["stage"][0]] * 17)], "stage"),
    ("a stage name with a dot", [(("stage", 0, "name"), "to.ken")], "stage[0].name"),
    ("a stage named event", [(("stage", 0, "name"), "event")], "stage[0].name"),
    ("two stages of one name", [(("stage", 1, "name"), "tokenize")], "stage[1].name"),
    ("a stage without inputs", [(("stage", 0, "inputs"), DELETE)], "stage[0].inputs"),
    ("inputs that are not a table", [(("stage", 0, "inputs"), "event.text")], "stage[0].inputs"),
    ("a reference to a later stage", [(("stage", 0, "inputs"), {"text": "embed.x"})], "stage[0].inputs.text"),
    ("a reference to the stage itself", [(("stage", 1, "inputs", "input_ids"), "embed.x")], "stage[1].inputs.input_ids"),
    ("a reference to no stage", [(("stage", 1, "inputs", "input_ids"), "tokenise.input_ids")], "stage[1].inputs.input_ids"),
    ("a reference without a dot", [(("stage", 0, "inputs", "text"), "text")], "stage[0].inputs.text"),
    ("a reference that is not text", [(("stage", 0, "inputs", "text"), 1)], "stage[0].inputs.text"),
    ("an event input with a space", [(("stage", 0, "inputs", "text"), "event.te xt")], "stage[0].inputs.text"),
    ("a stage whose outputs nobody uses",
     [(("stage",), BASE["stage"] + [{"name": "spare", "model": "pooling.onnx", "inputs": {"x": "event.text"}}])],
     "stage[3]"),
    ("nothing read from the event", [(("stage", 0, "inputs"), {})], "stage"),
    ("a model file that does not exist", [(("stage", 0, "model"), "missing.onnx")], "stage[0].model"),
    ("a model file by absolute path", [(("stage", 0, "model"), "/nonexistent/model.onnx")], "stage[0].model"),
    ("an empty model name", [(("stage", 0, "model"), "")], "stage[0].model"),
    ("no result outputs", [(("result", "outputs"), {})], "result.outputs"),
    ("a result name with a space", [(("result", "outputs"), {"an embedding": "pool.embedding"})], "result.outputs"),
    ("a result from no stage", [(("result", "outputs"), {"embedding": "pooling.embedding"})], "result.outputs.embedding"),
    ("when on an event input", [(("result", "when"), "event.text")], "result.when"),
    ("when on no stage", [(("result", "when"), "nosuch.match")], "result.when"),
    ("a + inside a level", [(("source", "topic"), "sensors/a+/text")], "source.topic"),
    ("a # before the last level", [(("source", "topic"), "sensors/#/text")], "source.topic"),
    ("a # inside a level", [(("source", "topic"), "sensors/text#")], "source.topic"),
    ("an empty level", [(("source", "topic"), "sensors//text")], "source.topic"),
    ("a dot in a level (two AMQP words)", [(("source", "topic"), "sensors/a.b")], "source.topic"),
    ("a $ topic", [(("source", "topic"), "$SYS/broker/load")], "source.topic"),
    ("a topic longer than a routing key", [(("source", "topic"), "a" * 128 + "/" + "b" * 127)], "source.topic"),
    ("a source on the pool's job topics", [(("source", "topic"), "enclaveq/+/jobs")], "source.topic"),
    ("a source on every topic", [(("source", "topic"), "#")], "source.topic"),
    ("a source on the reply topics", [(("source", "topic"), "enclaveq/reply/#")], "source.topic"),
    ("a source on a pool lock", [(("source", "topic"), "enclaveq/p1/founder-lock")], "source.topic"),
    ("a source on an inbox's topic", [(("source", "topic"), "enclaveq/_inbox/inbox-1/requeue")], "source.topic"),
    ("a source on a pool's event streams", [(("source", "topic"), "enclaveq/p1/streams/s1/meta")], "source.topic"),
    ("seventeen levels", [(("source", "topic"), "/".join(["a"] * 17))], "source.topic"),
    ("a sink with a +", [(("sink", "topic"), "alerts/+")], "sink.topic"),
    ("a sink with a #", [(("sink", "topic"), "alerts/#")], "sink.topic"),
    ("a sink into a pool's control topic", [(("sink", "topic"), "enclaveq/p1/control")], "sink.topic"),
    ("a sink into a pool's sessions", [(("sink", "topic"), "enclaveq/p1/sessions/worker-1")], "sink.topic"),
    ("a sink the source matches", [(("source", "topic"), "sensors/#"), (("sink", "topic"), "sensors/alerts")],
     "sink.topic"),
    ("a RabbitMQ exchange", [(("source", "exchange"), "amq.topic")], "source.exchange"),
    ("a pool's control exchange", [(("sink", "exchange"), "enclaveq.p1.control")], "sink.exchange"),
    ("the default exchange", [(("sink", "exchange"), "")], "sink.exchange"),
    ("no recipients", [(("access", "recipients"), [])], "access.recipients"),
    ("65 recipients", [(("access", "recipients"), [crypto.public_bytes(generate_recipient_key()).hex()
                                                   for _ in range(65)])], "access.recipients"),
    ("recipients that are not a list", [(("access", "recipients"), ALICE_PUB.hex())], "access.recipients"),
    ("a recipient that is not hex", [(("access", "recipients"), ["zz" * 32])], "access.recipients[0]"),
    ("a recipient of 31 bytes", [(("access", "recipients"), [ALICE_PUB.hex()[:62]])], "access.recipients[0]"),
    ("a small-order recipient", [(("access", "recipients"), [ALICE_PUB.hex(), X25519_SMALL_ORDER.hex()])],
     "access.recipients[1]"),
    ("a recipient listed twice", [(("access", "recipients"), [ALICE_PUB.hex(), ALICE_PUB.hex().upper()])],
     "access.recipients"),
    ("a producer that is not hex", [(("access", "producers"), ["not a key"])], "access.producers[0]"),
    ("a small-order producer", [(("access", "producers"), [ED25519_IDENTITY.hex()])], "access.producers[0]"),
]


@pytest.mark.parametrize(("changes", "key"), [case[1:] for case in BAD_TOMLS], ids=[case[0] for case in BAD_TOMLS])
def test_a_definition_that_breaks_a_rule_is_refused_naming_the_toml_key(tmp_path, changes, key):
    with pytest.raises(PipelineError) as refused:
        load_pipeline_toml(write_pipeline(tmp_path, changes))
    assert refused.value.key == key
    message = str(refused.value)
    assert message.startswith(f"{key}: ") and "\n" not in message
    assert ALICE_PUB.hex() not in message.lower() and "sentence embedding" not in message


def test_a_file_that_is_not_toml_is_refused_without_quoting_it(tmp_path):
    with pytest.raises(PipelineError) as refused:
        load_pipeline_toml(write_pipeline(tmp_path, text='[pipeline]\nname = "s3cr3t-value\n'))
    assert refused.value.key == "" and "not valid TOML" in str(refused.value)
    assert "s3cr3t" not in str(refused.value) and "\n" not in str(refused.value)


def test_a_toml_error_does_not_quote_the_keys_it_names(tmp_path):
    with pytest.raises(PipelineError) as refused:
        load_pipeline_toml(write_pipeline(tmp_path, text="[s3cr3t]\na = 1\n[s3cr3t]\nb = 2\n"))
    assert "s3cr3t" not in str(refused.value) and "line 3" in str(refused.value)


def test_a_model_file_is_named_relative_to_the_toml_even_when_an_absolute_path_exists(tmp_path):
    absolute = str(tmp_path / "tokenizer.onnx")
    with pytest.raises(PipelineError, match="relative") as refused:
        load_pipeline_toml(write_pipeline(tmp_path, [(("stage", 0, "model"), absolute)]))
    assert refused.value.key == "stage[0].model"


def test_a_model_file_in_a_subdirectory_is_read(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tok.onnx").write_bytes(b"another tokenizer")
    spec, models = load_pipeline_toml(write_pipeline(tmp_path, [(("stage", 0, "model"), "models/tok.onnx")]))
    assert models[spec.model_ids[0]] == b"another tokenizer"


def test_topics_in_the_brokers_own_namespace_are_refused_as_such(tmp_path):
    with pytest.raises(PipelineError, match="belong to the broker"):
        load_pipeline_toml(write_pipeline(tmp_path, [(("source", "topic"), "$share/group/sensors")]))


def test_a_missing_toml_file_is_a_pipeline_error(tmp_path):
    with pytest.raises(PipelineError, match="no pipeline TOML file"):
        load_pipeline_toml(tmp_path / "nothing.toml")


def test_the_same_checks_hold_for_a_spec_built_in_code(spec):
    with pytest.raises(PipelineError) as refused:
        dataclasses.replace(spec, when=Reference("embed", "last_hidden_state"), sink_topic="enclaveq/p1/jobs")
    assert refused.value.key == "sink.topic"
    with pytest.raises(PipelineError) as refused:
        dataclasses.replace(spec, outputs=(("embedding", Reference("pool.x", "embedding")),))
    assert refused.value.key == "result.outputs.embedding"


# --------------------------------------------------------------------------- ids and canonical form


def test_the_pipeline_id_is_the_documented_hash_of_owner_key_and_name():
    expected = hashlib.sha256(b"enclaveq pipeline v1\0" + OWNER_PUB + b"text-embedding").hexdigest()
    assert pipeline_id(OWNER_PUB, "text-embedding") == expected
    assert pipeline_id(public_key_bytes(MALLORY), "text-embedding") != expected
    assert pipeline_id(OWNER_PUB, "text-embedding2") != expected


def test_the_canonical_spec_decodes_to_the_same_spec_and_orders_its_lists(spec):
    assert PipelineSpec.from_canonical(spec.canonical()) == spec
    shuffled = dataclasses.replace(spec, recipients=tuple(reversed(spec.recipients)),
                                   stages=(spec.stages[0], dataclasses.replace(
                                       spec.stages[1], inputs=tuple(reversed(spec.stages[1].inputs)))) + spec.stages[2:])
    assert shuffled.canonical() == spec.canonical()


def test_a_spec_in_another_encoding_of_the_same_values_is_refused(spec):
    fields = unpack(spec.canonical())
    fields["rcpt"] = list(reversed(fields["rcpt"]))  # unsorted recipients
    with pytest.raises(MalformedMessage, match="canonical"):
        PipelineSpec.from_canonical(pack(fields))
    reordered = dict(reversed(list(unpack(spec.canonical()).items())))
    with pytest.raises(MalformedMessage):
        PipelineSpec.from_canonical(pack(reordered))


# --------------------------------------------------------------------------- signatures and replays


def test_a_signed_definition_round_trips_and_verifies(spec):
    signed = sign_pipeline(spec, OWNER, 1_700_000_000_000)
    again = SignedPipeline.from_bytes(signed.to_bytes())
    assert again == signed and again.spec == spec
    assert again.pipeline_id == pipeline_id(OWNER_PUB, spec.name)
    again.verify()


def test_the_signed_bytes_are_the_documented_list(spec):
    signed = sign_pipeline(spec, OWNER, 5)
    wire = unpack(signed.to_bytes())
    assert wire["t"] == DEFINITION_KIND
    assert unpack(wire["m"]) == [DEFINITION_LABEL, signed.pipeline_id, OWNER_PUB, 5, spec.canonical()]


def test_a_definition_signed_by_anyone_but_the_owner_it_names_is_refused(spec):
    forged = SignedPipeline(spec=spec, owner_key=OWNER_PUB, issued_ms=5,
                            signature=MALLORY.sign(SignedPipeline.signed_bytes(spec, OWNER_PUB, 5)))
    with pytest.raises(SignatureInvalid):
        forged.verify()
    with pytest.raises(SignatureInvalid):
        SignedPipeline.from_bytes(forged.to_bytes())


def test_another_owner_of_the_same_name_gets_another_pipeline(spec):
    hers = sign_pipeline(spec, MALLORY, 10)
    mine = sign_pipeline(spec, OWNER, 5)
    assert hers.pipeline_id != mine.pipeline_id and not hers.replaces(mine)


def test_a_definition_whose_id_is_not_its_owners_is_refused(spec):
    message = pack([DEFINITION_LABEL, pipeline_id(public_key_bytes(MALLORY), spec.name), OWNER_PUB, 5,
                    spec.canonical()])
    wire = pack({"v": 1, "t": DEFINITION_KIND, "m": message, "sig": OWNER.sign(message)})
    with pytest.raises(MalformedMessage, match="not derived"):
        SignedPipeline.from_bytes(wire)


def test_every_single_byte_change_of_a_signed_definition_is_refused(spec):
    data = sign_pipeline(spec, OWNER, 5).to_bytes()
    for i in range(len(data)):
        changed = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]
        with pytest.raises(ProtocolError):
            SignedPipeline.from_bytes(changed)


def test_an_oversized_definition_is_refused_before_it_is_parsed():
    with pytest.raises(MalformedMessage, match="larger than any valid"):
        SignedPipeline.from_bytes(b"\x00" * (MAX_SIGNED_PIPELINE_BYTES + 1))


def test_only_a_strictly_newer_definition_of_the_same_pipeline_replaces_the_one_in_force(spec):
    current = sign_pipeline(spec, OWNER, 100)
    assert sign_pipeline(spec, OWNER, 101).replaces(current)
    assert not sign_pipeline(spec, OWNER, 100).replaces(current)   # a replay of the same issued_ms
    assert not sign_pipeline(spec, OWNER, 99).replaces(current)    # an older one
    assert not sign_pipeline(dataclasses.replace(spec, name="other"), OWNER, 101).replaces(current)
    assert current.replaces(None)


def test_a_delete_order_round_trips_and_deletes_only_an_older_definition_of_its_owner(spec):
    current = sign_pipeline(spec, OWNER, 100)
    order = sign_pipeline_delete(current.pipeline_id, OWNER, 101)
    assert PipelineDelete.from_bytes(order.to_bytes()) == order
    assert unpack(unpack(order.to_bytes())["m"]) == [DELETE_LABEL, current.pipeline_id, OWNER_PUB, 101]
    assert order.deletes(current)
    assert not sign_pipeline_delete(current.pipeline_id, OWNER, 100).deletes(current)
    assert not sign_pipeline_delete(current.pipeline_id, MALLORY, 200).deletes(current)
    assert not sign_pipeline_delete("00" * 32, OWNER, 200).deletes(current)


def test_a_delete_order_signed_by_another_key_is_refused(spec):
    pid = pipeline_id(OWNER_PUB, spec.name)
    forged = PipelineDelete(pipeline_id=pid, owner_key=OWNER_PUB, issued_ms=5,
                            signature=MALLORY.sign(PipelineDelete.signed_bytes(pid, OWNER_PUB, 5)))
    with pytest.raises(SignatureInvalid):
        PipelineDelete.from_bytes(forged.to_bytes())


def test_model_and_pipeline_signatures_never_stand_in_for_each_other(spec):
    pid = pipeline_id(OWNER_PUB, spec.name)
    model_delete = DeleteOrder(model_id=pid, owner_key=OWNER_PUB, issued_at_ms=5).sign(OWNER)
    as_pipeline_delete = pack({**unpack(model_delete), "t": DELETE_KIND})
    with pytest.raises(MalformedMessage, match="wrong label"):
        PipelineDelete.from_bytes(as_pipeline_delete)
    pipeline_delete = sign_pipeline_delete(pid, OWNER, 5).to_bytes()
    with pytest.raises(MalformedMessage, match="wrong label"):
        DeleteOrder.verify(pack({**unpack(pipeline_delete), "t": "model_delete_order"}))


# --------------------------------------------------------------------------- stage mapping


def signatures():
    seq = ("tensor(int64)", [1, "sequence"])
    return {
        TOKENIZER: ({"text": ("tensor(string)", [1])},
                    {"input_ids": seq, "attention_mask": seq, "token_type_ids": seq}),
        MINILM: ({"input_ids": ("int64", ["batch", "sequence"]), "attention_mask": ("int64", ["batch", "sequence"]),
                  "token_type_ids": ("int64", ["batch", "sequence"])},
                 {"last_hidden_state": ("tensor(float)", ["batch", "sequence", 384])}),
        POOLING: ({"last_hidden_state": ("float32", [None, None, 384]), "attention_mask": ("int64", None)},
                  {"embedding": ("float32", [1, 384]), "match": ("tensor(bool)", [1])}),
    }


def test_a_mapping_that_fits_the_models_returns_what_each_event_input_must_be(spec):
    assert check_stage_mapping(spec, signatures()) == {"text": ("string", [1])}


def test_a_when_on_one_boolean_type_checks(spec):
    check_stage_mapping(dataclasses.replace(spec, when=Reference("pool", "match")), signatures())


def changed_signature(model: str, side: int, name: str, value):
    sigs = signatures()
    inputs, outputs = (dict(d) for d in sigs[model])
    part = (inputs, outputs)[side]
    if value is DELETE:
        del part[name]
    else:
        part[name] = value
    sigs[model] = (inputs, outputs)
    return sigs


MAPPING_ERRORS = [
    ("a model the pool does not hold", lambda: {k: v for k, v in signatures().items() if k != MINILM},
     UnknownStageModel, "stage[1].model"),
    ("a referenced output that does not exist", lambda: changed_signature(TOKENIZER, 1, "token_type_ids", DELETE),
     StageMappingError, "stage[1].inputs.token_type_ids"),
    ("a model input left unmapped", lambda: changed_signature(MINILM, 0, "position_ids", ("int64", [1, 8])),
     StageMappingError, "stage[1].inputs.position_ids"),
    ("a mapped name the model does not have", lambda: changed_signature(MINILM, 0, "token_type_ids", DELETE),
     StageMappingError, "stage[1].inputs.token_type_ids"),
    ("dtypes that differ", lambda: changed_signature(MINILM, 0, "input_ids", ("tensor(int32)", ["b", "s"])),
     StageMappingError, "stage[1].inputs.input_ids"),
    ("ranks that differ", lambda: changed_signature(MINILM, 0, "input_ids", ("int64", ["b", "s", "x"])),
     StageMappingError, "stage[1].inputs.input_ids"),
    ("fixed dimensions that differ", lambda: changed_signature(POOLING, 0, "last_hidden_state", ("float32", [1, 8, 768])),
     StageMappingError, "stage[2].inputs.last_hidden_state"),
    ("a result output that does not exist", lambda: changed_signature(POOLING, 1, "embedding", DELETE),
     StageMappingError, "result.outputs.embedding"),
]


@pytest.mark.parametrize(("make", "error", "key"), [c[1:] for c in MAPPING_ERRORS], ids=[c[0] for c in MAPPING_ERRORS])
def test_a_stage_mapping_that_does_not_type_check_is_refused_naming_the_key(spec, make, error, key):
    with pytest.raises(error) as refused:
        check_stage_mapping(spec, make())
    assert refused.value.key == key and "\n" not in str(refused.value)


@pytest.mark.parametrize("condition", [("tensor(float)", [1]), ("bool", [3]), ("bool", [1, 2])],
                         ids=["not a boolean", "three booleans", "two booleans"])
def test_a_when_that_is_not_one_boolean_is_refused(spec, condition):
    sigs = changed_signature(POOLING, 1, "match", condition)
    with pytest.raises(StageMappingError) as refused:
        check_stage_mapping(dataclasses.replace(spec, when=Reference("pool", "match")), sigs)
    assert refused.value.key == "result.when"


def test_one_event_input_used_as_two_different_types_is_refused(tmp_path):
    spec, _ = load_pipeline_toml(write_pipeline(tmp_path, [(("stage", 2, "inputs", "attention_mask"), "event.text")]))
    with pytest.raises(StageMappingError) as refused:
        check_stage_mapping(spec, signatures())
    assert refused.value.key == "stage[2].inputs.attention_mask"


def test_symbolic_dimensions_match_fixed_ones_and_the_fixed_ones_are_kept(tmp_path):
    spec, _ = load_pipeline_toml(write_pipeline(tmp_path, [(("stage", 1, "inputs", "token_type_ids"), "event.types"),
                                                           (("stage", 2, "inputs", "attention_mask"), "event.types")]))
    sigs = changed_signature(MINILM, 0, "token_type_ids", ("int64", ["batch", 8]))
    sigs[POOLING][0]["attention_mask"] = ("int64", [1, "sequence"])
    assert check_stage_mapping(spec, sigs)["types"] == ("int64", [1, 8])


# --------------------------------------------------------------------------- sealed results


EPOCH = 3
POOL_KEY = crypto.generate_private_key()
POOL_KEYS = {EPOCH: crypto.public_bytes(POOL_KEY)}
PID = pipeline_id(OWNER_PUB, "text-embedding")
EMBEDDING = np.linspace(-1, 1, 6, dtype=np.float32).reshape(1, 6)


def result(**changes) -> PipelineResult:
    fields = dict(pipeline_id=PID, event_id="evt-0001", stage_models=(TOKENIZER, MINILM, POOLING),
                  publisher=PRODUCER_PUB, pool="p1", epoch=EPOCH, produced_ms=1_700_000_000_123,
                  outputs={"embedding": EMBEDDING, "label": np.array(["markdown", "pdf"], dtype=object)})
    return PipelineResult(**{**fields, **changes})


def sealed(value: PipelineResult | None = None, recipients=(ALICE_PUB, BOB_PUB)) -> bytes:
    return seal_result_for_recipients(value or result(), list(recipients), POOL_KEY)


def opened(data: bytes, key=ALICE, **kwargs) -> PipelineResult:
    return open_result(data, key, POOL_KEYS.get, pool=kwargs.pop("pool", "p1"), **kwargs)


def test_each_of_two_recipients_opens_the_result_with_everything_the_worker_put_in_it():
    data = sealed()
    for key in (ALICE, BOB):
        got = opened(data, key)
        assert (got.pipeline_id, got.event_id, got.stage_models, got.pool, got.epoch, got.produced_ms) == (
            PID, "evt-0001", (TOKENIZER, MINILM, POOLING), "p1", EPOCH, 1_700_000_000_123)
        assert got.publisher_key == PRODUCER_PUB and got.publisher_session is None
        assert np.array_equal(got.outputs["embedding"], EMBEDDING) and got.outputs["embedding"].dtype == np.float32
        assert got.outputs["label"].tolist() == ["markdown", "pdf"] and got.outputs["label"].dtype == object


def test_a_publisher_without_a_key_is_named_by_its_session_id():
    got = opened(sealed(result(publisher=b"\x07" * 16)))
    assert got.publisher_key is None and got.publisher_session == b"\x07" * 16


def test_a_key_that_is_not_a_recipient_cannot_open_the_result():
    with pytest.raises(NotARecipient):
        opened(sealed(), CAROL)


def test_the_broker_sees_the_header_and_no_output_in_clear():
    data = sealed()
    assert peek_result_header(data) == ResultHeader(pool="p1", epoch=EPOCH, pipeline_id=PID, event_id="evt-0001")
    assert set(unpack(unpack(data)["h"])) == {"v", "t", "pool", "ep", "pid", "eid"}
    for secret in (EMBEDDING.tobytes(), b"markdown", PRODUCER_PUB, ALICE_PUB, BOB_PUB, TOKENIZER.encode()):
        assert secret not in data


def test_every_single_byte_change_of_a_sealed_result_is_refused_by_every_recipient():
    data = sealed(result(outputs={"score": np.array([0.5], dtype=np.float32)}))
    for i in range(len(data)):
        for mask in (0x01, 0x80):
            changed = data[:i] + bytes([data[i] ^ mask]) + data[i + 1:]
            for key in (ALICE, BOB):
                with pytest.raises(ProtocolError):
                    opened(changed, key)


def test_a_truncated_or_extended_result_is_refused():
    data = sealed()
    for changed in (data[:-1], data + b"\x00", data[: len(data) // 2]):
        with pytest.raises(ProtocolError):
            opened(changed)


def test_a_result_sealed_by_someone_without_the_pool_key_is_refused_by_the_origin_tag(monkeypatch):
    """The attacker knows the recipients' public keys and has seen a genuine result of the pipeline,
    so it can copy the slot ids; it seals its own content to Alice with a fresh K, nonce and
    header, and computes everything it can -- all but the tag, which needs the pool's key."""
    genuine = unpack(sealed())
    fake = result(outputs={"embedding": np.zeros((1, 6), dtype=np.float32)}, event_id="evt-0002")
    header = ResultHeader(pool="p1", epoch=EPOCH, pipeline_id=PID, event_id="evt-0002").to_bytes()
    header_hash = hashlib.sha256(header).digest()
    content_key, nonce = b"\x42" * 32, b"\x24" * 12
    k_payload, k_bind = results_module._content_keys(content_key, header_hash)
    payload = AESGCM(k_payload).encrypt(nonce, results_module.encode_result_body(fake), header)
    slots = [(slot[0], crypto.hpke_seal(content_key, pub, results_module._key_info(header_hash)))
             for slot, pub in zip(genuine["r"], (ALICE_PUB, BOB_PUB))]  # slots in the order sealed
    digest = results_module._digest(header, nonce, payload, slots)
    tags = [bytes(32), bytes(32)]
    forged = pack({"v": 1, "h": header, "n": nonce, "c": payload, "r": [[s, k, t] for (s, k), t in zip(slots, tags)],
                   "b": results_module._bind(k_bind, digest, tags)})
    opens = []
    real_open = crypto.hpke_open
    monkeypatch.setattr(crypto, "hpke_open", lambda *a: opens.append(1) or real_open(*a))
    for key in (ALICE, BOB):
        with pytest.raises(ResultForged):
            opened(forged, key)
    assert opens == []  # refused on the tag, before anything was decrypted


def test_a_result_sealed_with_another_pool_key_has_no_slot_for_the_recipient():
    impostor = seal_result_for_recipients(result(), [ALICE_PUB], crypto.generate_private_key())
    with pytest.raises(NotARecipient):
        opened(impostor)


def test_a_co_recipient_who_knows_the_content_key_cannot_rewrite_the_payload_for_another():
    data = unpack(sealed())
    header_hash = hashlib.sha256(data["h"]).digest()
    bob_slot = next(s for s in data["r"] if _opens(s[1], BOB, header_hash))
    content_key = crypto.hpke_open(bob_slot[1], BOB, results_module._key_info(header_hash))
    k_payload, k_bind = results_module._content_keys(content_key, header_hash)
    rewritten = result(outputs={"embedding": np.ones((1, 6), dtype=np.float32)})
    data["c"] = AESGCM(k_payload).encrypt(data["n"], results_module.encode_result_body(rewritten), data["h"])
    digest = results_module._digest(data["h"], data["n"], data["c"], [(s[0], s[1]) for s in data["r"]])
    data["b"] = results_module._bind(k_bind, digest, [s[2] for s in data["r"]])
    with pytest.raises(ResultForged):
        opened(pack(data), ALICE)


def _opens(sealed_key: bytes, key, header_hash: bytes) -> bool:
    try:
        crypto.hpke_open(sealed_key, key, results_module._key_info(header_hash))
        return True
    except ProtocolError:
        return False


def test_a_slot_moved_from_another_result_of_the_pipeline_does_not_open():
    first, second = unpack(sealed(result(event_id="evt-1"))), unpack(sealed(result(event_id="evt-2")))
    second["r"] = first["r"]
    with pytest.raises(ResultForged):
        opened(pack(second))


def test_the_ids_inside_must_equal_the_clear_header(monkeypatch):
    real = results_module.encode_result_body
    monkeypatch.setattr(results_module, "encode_result_body", lambda r: real(dataclasses.replace(r, event_id="other")))
    data = sealed()
    with pytest.raises(ResultForged):
        opened(data)


def test_a_body_with_fields_this_version_does_not_know_is_refused(monkeypatch):
    real = results_module.encode_result_body
    monkeypatch.setattr(results_module, "encode_result_body", lambda r: pack({**unpack(real(r)), "extra": 1}))
    data = sealed()
    with pytest.raises(MalformedMessage, match="unexpected fields"):
        opened(data)


def test_the_sealed_result_follows_the_documented_derivations():
    """Recomputed here from docs/protocol.md §13 with cryptography's primitives, independently of
    protocol/results.py: the slot id, the tag, the sealed key's info and the bind."""
    import hmac as hmac_module

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    def hkdf64(ikm, salt, info):
        okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=info).derive(ikm)
        return okm[:32], okm[32:]

    def mac(key, message):
        return hmac_module.new(key, message, hashlib.sha256).digest()

    wire = unpack(sealed())
    header, slots = wire["h"], wire["r"]
    z = ALICE.exchange(POOL_KEY.public_key())
    k_slot, k_tag = hkdf64(z, b"enclaveq/v1/result-origin",
                           pack([b"enclaveq/v1/result-origin", "p1", EPOCH, POOL_KEYS[EPOCH], ALICE_PUB]))
    slot_id = mac(k_slot, pack([b"enclaveq/v1/result-slot", PID]))[:16]
    alice = next(slot for slot in slots if slot[0] == slot_id)
    digest = hashlib.sha256(pack([b"enclaveq/v1/result-digest", header, wire["n"], [s[:2] for s in slots],
                                  len(wire["c"])]) + wire["c"]).digest()
    assert alice[2] == mac(k_tag, digest)
    header_hash = hashlib.sha256(header).digest()
    content_key = crypto.hpke_open(alice[1], ALICE, pack([b"enclaveq/v1/result-key", header_hash]))
    k_payload, k_bind = hkdf64(content_key, None, pack([b"enclaveq/v1/result-content", header_hash]))
    assert wire["b"] == mac(k_bind, pack([b"enclaveq/v1/result-bind", digest, [s[2] for s in slots]]))
    body = unpack(AESGCM(k_payload).decrypt(wire["n"], wire["c"], header))
    assert list(body) == ["v", "pid", "eid", "sm", "pub", "pool", "ep", "ms", "t"]
    assert unpack(header) == {"v": 1, "t": "pipeline_result", "pool": "p1", "ep": EPOCH, "pid": PID,
                              "eid": "evt-0001"}


def test_a_result_of_an_epoch_the_recipient_does_not_trust_is_refused():
    with pytest.raises(UnknownEpoch):
        opened(sealed(result(epoch=EPOCH + 1)))


def test_a_result_from_another_pool_is_refused():
    with pytest.raises(WrongPool):
        opened(sealed(), pool="p2")


def test_a_result_is_decoded_within_bounds_before_anything_is_checked():
    data = sealed()
    with pytest.raises(OversizedMessage):
        opened(data, max_bytes=len(data) - 1)
    too_many = unpack(data)
    too_many["r"] = too_many["r"] * 33  # 66 slots
    asked = []
    with pytest.raises(OversizedMessage):
        open_result(pack(too_many), ALICE, lambda epoch: asked.append(epoch) or POOL_KEYS.get(epoch), pool="p1")
    big_header = unpack(data)
    big_header["h"] = b"\x00" * 2000
    with pytest.raises(MalformedMessage):
        opened(pack(big_header))
    assert asked == []


def test_a_header_in_another_encoding_of_the_same_values_is_refused_before_any_key_is_looked_up():
    data = unpack(sealed())
    header = unpack(data["h"])
    data["h"] = _with_wide_epoch(header)
    asked = []
    with pytest.raises(MalformedMessage, match="canonical"):
        open_result(pack(data), ALICE, lambda epoch: asked.append(epoch) or POOL_KEYS.get(epoch), pool="p1")
    assert asked == []


def _with_wide_epoch(header: dict) -> bytes:
    # The same map with the epoch as a uint64 (0xcf) instead of a fixint: same values, other bytes.
    canonical = pack(header)
    before, after = canonical.split(b"\xa2ep" + pack(header["ep"]), 1)
    return before + b"\xa2ep\xcf" + header["ep"].to_bytes(8, "big") + after


def test_a_result_listing_one_slot_twice_is_malformed():
    data = unpack(sealed())
    data["r"] = [data["r"][0], data["r"][0]]
    with pytest.raises(MalformedMessage, match="two slots"):
        opened(pack(data))


def test_seal_refuses_recipient_lists_that_no_pipeline_can_have():
    with pytest.raises(MalformedMessage):
        sealed(recipients=())
    with pytest.raises(MalformedMessage):
        sealed(recipients=(ALICE_PUB, ALICE_PUB))
    with pytest.raises(MalformedMessage):
        sealed(recipients=(ALICE_PUB, X25519_SMALL_ORDER))


@pytest.mark.parametrize("event_id", ["", "../etc/passwd", ".hidden", "a/b", "x" * 65, "tab\there"])
def test_event_ids_are_safe_file_names(event_id):
    with pytest.raises(MalformedMessage):
        result(event_id=event_id)


def test_results_are_not_msgpack_that_happens_to_parse():
    with pytest.raises(ProtocolError):
        opened(msgpack.packb({"v": 1}))


# --------------------------------------------------------------------------- fuzz


FUZZ = settings(max_examples=60, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.cache
def fuzz_targets() -> dict:
    """Each parser of bytes the broker can write, with one valid message of its kind (the spec
    built in code: the same pipeline as BASE)."""
    spec = PipelineSpec(
        name="text-embedding", source_topic="enclaveq/examples/text", sink_topic="enclaveq/examples/text/embeddings",
        stages=(Stage("tokenize", TOKENIZER, (("text", Reference("event", "text")),)),
                Stage("embed", MINILM, (("input_ids", Reference("tokenize", "input_ids")),))),
        outputs=(("embedding", Reference("embed", "last_hidden_state")),), recipients=(ALICE_PUB, BOB_PUB))
    signed = sign_pipeline(spec, OWNER, 5)
    return {
        "result": (sealed(), opened),
        "result header": (sealed(), peek_result_header),
        "definition": (signed.to_bytes(), SignedPipeline.from_bytes),
        "delete": (sign_pipeline_delete(signed.pipeline_id, OWNER, 6).to_bytes(), PipelineDelete.from_bytes),
        "spec": (spec.canonical(), PipelineSpec.from_canonical),
    }


def _mutate(data: bytes, draw) -> bytes:
    i = draw(st.integers(0, len(data) - 1))
    how = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
    if how == "flip":
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    if how == "truncate":
        return data[:i]
    if how == "insert":
        return data[:i] + draw(st.binary(min_size=1, max_size=8)) + data[i:]
    if how == "delete":
        return data[:i] + data[i + draw(st.integers(1, 8)):]
    return data[:i] + bytes([draw(st.sampled_from([0xC0, 0xC1, 0xC4, 0xCF, 0xD9, 0xDC, 0xDD, 0xDE, 0xDF, 0x9F]))]) + data[i + 1:]


@pytest.mark.parametrize("target", ["result", "result header", "definition", "delete", "spec"])
@FUZZ
@given(data=st.data())
def test_whatever_the_broker_sends_a_parser_returns_or_raises_a_protocol_error(target, data):
    valid, parse = fuzz_targets()[target]
    candidate = valid
    for _ in range(data.draw(st.integers(0, 3))):
        candidate = _mutate(candidate, data.draw) if candidate else candidate
    if data.draw(st.booleans()) and candidate == valid:
        candidate = data.draw(st.binary(max_size=512))
    try:
        parse(candidate)
    except ProtocolError:
        pass
