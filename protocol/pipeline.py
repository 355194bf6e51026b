"""Pipelines (issue 11): the owner-signed definition of an event-driven chain of models.

A pipeline is declared in a TOML file (``load_pipeline_toml``; every key is described in
docs/pipelines.md), resolved into a ``PipelineSpec`` whose stage models are 64-hex model ids,
and uploaded to a pool as a ``SignedPipeline``: the owner's Ed25519 signature over the
canonical msgpack encoding of the spec. Two signed statements, each the signature of one
canonical msgpack list, wrapped like the model statements of protocol/ownership.py:

    definition  ["enclaveq/v1/pipeline-definition", pipeline_id, owner_key, issued_ms, spec bytes]
    delete      ["enclaveq/v1/pipeline-delete", pipeline_id, owner_key, issued_ms]

    pipeline_id = SHA-256(b"enclaveq pipeline v1\\0" || owner_key || name (UTF-8)).hex()

Why the composition is sound (the same argument as protocol/ownership.py, which this reuses):

- Domain separation. Each statement's first element is its own label, distinct from the model
  manifest, model delete and producer-session labels, so no signature made for one kind ever
  verifies as another -- in particular a model delete order can never delete a pipeline, nor a
  pipeline delete a model, whatever ids they carry. The id derivation has its own prefix, so a
  pipeline id is never the hash of anything else this code hashes.
- The id names the owner. Because ``pipeline_id`` hashes the owner's public key, a verifier
  recomputes it from the signed owner key and name and refuses a mismatch: nobody but the
  holder of that private key can ever publish a definition (or a delete order, which must name
  the owner recorded with the definition) under the id. Nothing else is needed to stop a
  stranger from replacing someone's pipeline.
- One message, one encoding. The spec is encoded canonically (fixed key order; stage inputs,
  result outputs, recipients and producers sorted) and the verifier re-encodes what it parsed
  and requires the exact bytes that were signed, so what a worker runs is exactly what was
  signed: no duplicated keys, no alternative integer widths, no trailing bytes.
- Replays. ``issued_ms`` is signed; a worker keeps, per pipeline id, the newest issued_ms of a
  definition or delete order it accepted and refuses anything older or equal
  (``SignedPipeline.replaces``, ``PipelineDelete.deletes``), so an old definition replayed by the
  broker neither rolls a pipeline back nor brings a deleted one back.
- Small-order keys are refused (owner, producers: Ed25519; recipients: X25519), so every
  accepted signature means "a private key holder signed this" and every recipient key is one
  whose owner can actually open results.

Nothing here does I/O except ``load_pipeline_toml``, which reads the TOML and the model files it
names. Every problem with a definition is a ``PipelineError`` whose one-line message starts with
the TOML key at fault (``stage[1].inputs.input_ids: ...``) and never quotes file contents or key
material; a signed definition from the wire that does not parse is a ``MalformedMessage``.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from .codec import pack, unpack
from .errors import MalformedMessage, OversizedMessage, ProtocolError
from .ownership import (
    PUBLIC_KEY_BYTES, SIGNATURE_BYTES, _open_signed, _public_key, _signed_form, _small_order, _uint, _verify,
    public_key_bytes,
)
from .tensors import MAX_NAME_LEN, ONNX_TYPES

# --------------------------------------------------------------------------- constants

PIPELINE_ID_PREFIX = b"enclaveq pipeline v1\0"
DEFINITION_LABEL = b"enclaveq/v1/pipeline-definition"
DELETE_LABEL = b"enclaveq/v1/pipeline-delete"
DEFINITION_KIND = "pipeline_definition"
DELETE_KIND = "pipeline_delete"
SPEC_VERSION = 1

DEFAULT_SOURCE_EXCHANGE = "enclaveq.events"
DEFAULT_SINK_EXCHANGE = "enclaveq.results"
EVENT = "event"  # the reference prefix of event inputs; therefore never a stage name

# Sizes of a definition. Generous for real chains (the text example has 3 stages of <= 3 inputs)
# and small enough that a worker holding many pipelines, and the parser of one, stay cheap.
MAX_STAGES = 16
MAX_STAGE_INPUTS = 64
MAX_RESULT_OUTPUTS = 64
MAX_RECIPIENTS = 64
MAX_PRODUCERS = 1024          # as a model manifest's allow-list (protocol.ownership)
MAX_DESCRIPTION = 1024        # characters
MAX_TOPIC = 255               # an AMQP routing key is at most 255 bytes; topics here are ASCII
MAX_TOPIC_LEVELS = 16          # as broker_adapters' check_topic
MAX_IO_NAME = MAX_NAME_LEN    # model input/output names: what protocol.tensors accepts on the wire
MAX_SPEC_BYTES = 256 * 1024   # the canonical encoding; far above any real pipeline
MAX_SIGNED_PIPELINE_BYTES = MAX_SPEC_BYTES + 1024
MAX_DELETE_BYTES = 1024
MAX_TOML_BYTES = 1024 * 1024
# Stage models named by file are read whole to hash them and upload them; the worker's default
# max_model_bytes is 512 MiB, so nothing larger could be used anyway.
MAX_MODEL_FILE_BYTES = 512 * 1024 * 1024

_PIPELINE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_STAGE_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
_EVENT_INPUT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_RESULT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MODEL_ID = re.compile(r"[0-9a-f]{64}")
_HEX64 = re.compile(r"[0-9A-Fa-f]{64}")
# Topic levels are restricted to characters that mean the same on MQTT and, once "/" becomes
# ".", in an AMQP binding key: "." would split a level into two AMQP words, "*" and "#" are AMQP
# wildcards, and anything else would need escaping that the two brokers do not share. The same
# set as broker_adapters' check_topic, so every topic accepted here is accepted by the adapters
# (tests/test_pipeline_protocol.py checks it).
_TOPIC_LEVEL = re.compile(r"[A-Za-z0-9_:=@-]{1,128}")
_EXCHANGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_SAFE_SHOWN = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# --------------------------------------------------------------------------- errors


class PipelineError(ProtocolError):
    """A pipeline definition breaks a rule. ``key`` is the TOML key at fault (``stage[1].model``),
    or "" for the file as a whole; the message is one line, starts with the key and never quotes
    file contents, descriptions or key material."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class StageMappingError(PipelineError):
    """A stage mapping that does not type-check against the real models (``check_stage_mapping``)."""


class UnknownStageModel(StageMappingError):
    """A stage names a model the pool does not hold."""


def _show(text: str) -> str:
    """A name from a definition, safe to put in a one-line error (names only, never values)."""
    if _SAFE_SHOWN.fullmatch(text):
        return text
    return ascii(text[:32]) + ("..." if len(text) > 32 else "")


# --------------------------------------------------------------------------- references


@dataclass(frozen=True, order=True)
class Reference:
    """Where a tensor comes from: ``event.<name>`` (an input of the event) or ``<stage>.<output>``.

    Stage names never contain ".", so the text splits at its first "."; an output name may
    contain more dots (ONNX names such as ``onnx::Gather.0``)."""

    source: str  # "event" or a stage name
    name: str    # the event input, or the stage model's output

    @property
    def is_event(self) -> bool:
        return self.source == EVENT

    def __str__(self) -> str:
        return f"{self.source}.{self.name}"

    @classmethod
    def parse(cls, text: object, *, key: str) -> Reference:
        if not isinstance(text, str):
            raise PipelineError(key, 'expected a reference string "event.<input>" or "<stage>.<output>"')
        source, dot, name = text.partition(".")
        if not dot or not source or not name:
            raise PipelineError(key, f'{_show(text)} is not "event.<input>" or "<stage>.<output>"')
        if source == EVENT:
            if not _EVENT_INPUT.fullmatch(name):
                raise PipelineError(key, "event input names are 1-64 characters from A-Z a-z 0-9 _ . -")
        else:
            if not _STAGE_NAME.fullmatch(source):
                raise PipelineError(key, f"{_show(source)} is not a stage name")
            _io_name(name, key=key, what="output name")
        return cls(source, name)


def _io_name(name: object, *, key: str, what: str) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_IO_NAME or _CONTROL.search(name):
        raise PipelineError(key, f"{what}s are 1-{MAX_IO_NAME} characters without control characters")
    return name


# --------------------------------------------------------------------------- topics


def _topic_levels(topic: object, *, key: str, wildcards: bool) -> list[str]:
    if not isinstance(topic, str) or not topic:
        raise PipelineError(key, "expected a non-empty topic string")
    if len(topic) > MAX_TOPIC:
        raise PipelineError(key, f"a topic is at most {MAX_TOPIC} characters (an AMQP routing key's limit)")
    if topic.startswith("$"):
        raise PipelineError(key, "topics starting with $ belong to the broker ($SYS, $share)")
    levels = topic.split("/")
    if len(levels) > MAX_TOPIC_LEVELS:
        raise PipelineError(key, f"a topic has at most {MAX_TOPIC_LEVELS} levels")
    for i, level in enumerate(levels):
        if level in ("+", "#"):
            if not wildcards:
                raise PipelineError(key, "a sink is one topic: no + or # wildcards")
            if level == "#" and i != len(levels) - 1:
                raise PipelineError(key, "# must be the last level of a topic filter")
        elif not _TOPIC_LEVEL.fullmatch(level):
            if "+" in level or "#" in level:
                raise PipelineError(key, "+ and # must fill a whole topic level")
            raise PipelineError(key, "topic levels are 1-128 characters from A-Z a-z 0-9 _ : = @ - separated by /")
    return levels


def check_event_topic(topic: object) -> str:
    """``topic`` if events can be published on it (one topic, no wildcards, levels every broker
    adapter maps unchanged); else :class:`PipelineError`. A topic that matches a pipeline's source
    filter only passes the filter's literal levels: the levels under its ``+`` and ``#`` are the
    producer's, and are checked here before any broker sees them."""
    _topic_levels(topic, key="", wildcards=False)  # raises for anything but a usable topic string
    return cast(str, topic)


# The topics the MQTT adapter uses itself (broker_adapters/mqtt.py; a superset of
# broker_adapters._common._INTERNAL_TOPICS): a pipeline must never subscribe to them, nor
# publish into them (a sink on enclaveq/<pool>/jobs would inject results into the job queue).
# Each pattern is a list of levels: a literal, "+", "#", or a predicate on one level.
_LevelPattern = str | Callable[[str], bool]
RESERVED_TOPICS: tuple[tuple[_LevelPattern, ...], ...] = (
    ("enclaveq", "_probe", "#"),
    ("enclaveq", "_inbox", "#"),
    ("enclaveq", "reply", "#"),
    ("enclaveq", "+", "jobs"),
    ("enclaveq", "+", "control"),
    ("enclaveq", "+", "dead"),
    ("enclaveq", "+", "meta"),
    ("enclaveq", "+", "sessions", "#"),
    ("enclaveq", "+", "streams", "#"),
    ("enclaveq", "+", lambda level: level.endswith("-lock"), "#"),
)


def _overlaps(levels: Sequence[_LevelPattern], pattern: Sequence[_LevelPattern]) -> bool:
    """Could one topic match both filters (MQTT rules: "+" one level, "#" the rest, including
    none: "a/#" matches "a")? Either side may hold predicates on a level."""
    for i in range(max(len(levels), len(pattern))):
        f = levels[i] if i < len(levels) else None
        p = pattern[i] if i < len(pattern) else None
        if f == "#" or p == "#":
            return True
        if f is None or p is None:
            return False
        if f == "+" or p == "+":
            continue
        if callable(p):
            if callable(f) or not p(f):
                return False  # two predicates never meet in a topic filter; keep it simple
        elif callable(f):
            if not f(p):
                return False
        elif f != p:
            return False
    return True


def amqp_binding_key(topic: str) -> str:
    """The AMQP topic-exchange binding (or routing) key of an MQTT topic (filter):
    "/" -> ".", "+" -> "*", "#" -> "#". Exact because topic levels cannot contain "." or "*"."""
    return ".".join("*" if level == "+" else level for level in topic.split("/"))


def _exchange(name: object, *, key: str) -> str:
    if not isinstance(name, str) or not _EXCHANGE.fullmatch(name):
        raise PipelineError(key, "exchange names are 1-128 characters from A-Z a-z 0-9 _ . - starting with a letter or digit")
    if name.startswith("amq."):
        raise PipelineError(key, "amq.* exchanges belong to RabbitMQ")
    # enclaveq.<pool>.control and enclaveq.<pool>.dlx are the pool's own exchanges: every
    # enclaveq.* name of more than two words is reserved for them (the defaults have two).
    if name.startswith("enclaveq.") and name.count(".") > 1:
        raise PipelineError(key, "enclaveq.<x>.<y> exchanges are reserved for the pool's own use")
    return name


# --------------------------------------------------------------------------- keys


def _x25519_key(raw: object, *, key: str) -> bytes:
    if not isinstance(raw, bytes) or len(raw) != PUBLIC_KEY_BYTES:
        raise PipelineError(key, f"expected a {PUBLIC_KEY_BYTES}-byte X25519 public key")
    try:
        # OpenSSL refuses a shared secret of all zeros, which is what every small-order point
        # gives: nobody could open a result sealed to such a key, so it is never a recipient.
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        raise PipelineError(key, "a small-order point, not a usable X25519 public key") from None
    return raw


def _ed25519_key(raw: object, *, key: str) -> bytes:
    if not isinstance(raw, bytes) or len(raw) != PUBLIC_KEY_BYTES:
        raise PipelineError(key, f"expected a {PUBLIC_KEY_BYTES}-byte Ed25519 public key")
    if _small_order(raw):
        raise PipelineError(key, "a small-order point, not a usable Ed25519 public key")
    return raw


def _hex_key(value: object, *, key: str) -> bytes:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise PipelineError(key, "expected 64 hex characters (a 32-byte public key)")
    return bytes.fromhex(value)


def pipeline_id(owner_public_key: bytes, name: str) -> str:
    """SHA-256(b"enclaveq pipeline v1\\0" || owner Ed25519 public key || name UTF-8), hex.

    The name is checked first, so the name -> bytes step is unambiguous (no NUL, no length
    games): one (owner, name) pair, one id, and only that owner's key signs under it."""
    if not isinstance(owner_public_key, bytes) or len(owner_public_key) != PUBLIC_KEY_BYTES:
        raise PipelineError("", f"the owner key must be a {PUBLIC_KEY_BYTES}-byte Ed25519 public key")
    if not isinstance(name, str) or not _PIPELINE_NAME.fullmatch(name):
        raise PipelineError("pipeline.name", "1-64 characters from A-Z a-z 0-9 _ . -")
    return hashlib.sha256(PIPELINE_ID_PREFIX + owner_public_key + name.encode()).hexdigest()


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class Stage:
    """One model of the chain. ``inputs`` maps every model input to where its tensor comes from;
    it is kept sorted by input name (the canonical order). Rules are checked by ``PipelineSpec``,
    which knows the stage's position."""

    name: str
    model: str  # 64 lowercase hex: SHA-256 of the ONNX bytes
    inputs: tuple[tuple[str, Reference], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", _sorted_pairs(self.inputs, key="stage.inputs"))


def _sorted_pairs(pairs: object, *, key: str) -> tuple[tuple[str, Reference], ...]:
    """(name, reference) pairs in the canonical order: sorted by name."""
    if not isinstance(pairs, (tuple, list)) or not all(
            isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) for p in pairs):
        raise PipelineError(key, "expected (name, reference) pairs")
    return tuple(sorted(((p[0], p[1]) for p in pairs), key=lambda p: p[0]))


@dataclass(frozen=True, kw_only=True)
class PipelineSpec:
    """A resolved pipeline definition: what the owner signs and the worker runs.

    Built by ``load_pipeline_toml`` or decoded from a signed definition; either way every rule
    of the TOML format is checked here, with errors naming the TOML key. ``recipients`` and
    ``producers`` are stored sorted; an empty ``producers`` means any producer the pool admits."""

    name: str
    source_topic: str
    stages: tuple[Stage, ...]
    outputs: tuple[tuple[str, Reference], ...]
    sink_topic: str
    recipients: tuple[bytes, ...]
    description: str = ""
    source_exchange: str = DEFAULT_SOURCE_EXCHANGE
    when: Reference | None = None
    sink_exchange: str = DEFAULT_SINK_EXCHANGE
    producers: tuple[bytes, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _PIPELINE_NAME.fullmatch(self.name):
            raise PipelineError("pipeline.name", "1-64 characters from A-Z a-z 0-9 _ . -")
        if not isinstance(self.description, str) or len(self.description) > MAX_DESCRIPTION:
            raise PipelineError("pipeline.description", f"expected text of at most {MAX_DESCRIPTION} characters")
        source = _topic_levels(self.source_topic, key="source.topic", wildcards=True)
        sink = _topic_levels(self.sink_topic, key="sink.topic", wildcards=False)
        for key, levels in (("source.topic", source), ("sink.topic", sink)):
            if any(_overlaps(levels, pattern) for pattern in RESERVED_TOPICS):
                raise PipelineError(key, "overlaps enclaveq's own topics (enclaveq/<pool>/jobs, control, dead, meta, "
                                         "sessions/#, streams/#, *-lock; enclaveq/reply/#, _inbox/#, _probe/#)")
        if _overlaps(source, sink):
            raise PipelineError("sink.topic", "matches source.topic: results would come back as events")
        _exchange(self.source_exchange, key="source.exchange")
        _exchange(self.sink_exchange, key="sink.exchange")
        self._check_stages()
        self._check_result()
        self._check_every_stage_is_used()
        object.__setattr__(self, "recipients", self._keys(self.recipients, "access.recipients", _x25519_key,
                                                          minimum=1, maximum=MAX_RECIPIENTS))
        object.__setattr__(self, "producers", self._keys(self.producers, "access.producers", _ed25519_key,
                                                         minimum=0, maximum=MAX_PRODUCERS))
        if not self.event_inputs:
            raise PipelineError("stage", "nothing refers to the event (no event.<input> reference): "
                                         "every event would give the same result")
        size = len(self.canonical())
        if size > MAX_SPEC_BYTES:
            raise PipelineError("", f"the definition encodes to {size} bytes, above the limit of {MAX_SPEC_BYTES}")

    # -- rules

    def _check_stages(self) -> None:
        if not isinstance(self.stages, (tuple, list)) or not 1 <= len(self.stages) <= MAX_STAGES:
            raise PipelineError("stage", f"a pipeline has 1-{MAX_STAGES} [[stage]] tables")
        object.__setattr__(self, "stages", tuple(self.stages))
        seen: set[str] = set()
        for i, stage in enumerate(self.stages):
            where = f"stage[{i}]"
            if not isinstance(stage, Stage):
                raise PipelineError(where, "expected a Stage")
            if not isinstance(stage.name, str) or not _STAGE_NAME.fullmatch(stage.name):
                raise PipelineError(f"{where}.name", "1-32 characters from A-Z a-z 0-9 _ -")
            if stage.name == EVENT:
                raise PipelineError(f"{where}.name", '"event" is reserved for event.<input> references')
            if stage.name in seen:
                raise PipelineError(f"{where}.name", f"a second stage named {stage.name}")
            if not isinstance(stage.model, str) or not _MODEL_ID.fullmatch(stage.model):
                raise PipelineError(f"{where}.model", "expected a model id: 64 lowercase hex characters")
            if len(stage.inputs) > MAX_STAGE_INPUTS:
                raise PipelineError(f"{where}.inputs", f"at most {MAX_STAGE_INPUTS} inputs per stage")
            names: set[str] = set()
            for input_name, ref in stage.inputs:
                key = f"{where}.inputs.{_show(str(input_name))}"
                _io_name(input_name, key=key, what="model input name")
                if input_name in names:
                    raise PipelineError(key, "mapped twice")
                names.add(input_name)
                self._check_ref(ref, key=key, earlier=seen)
            seen.add(stage.name)

    def _check_every_stage_is_used(self) -> None:
        used = {ref.source for stage in self.stages for _, ref in stage.inputs}
        used.update(ref.source for _, ref in self.outputs)
        if self.when is not None:
            used.add(self.when.source)
        for i, stage in enumerate(self.stages):
            if stage.name not in used:
                raise PipelineError(f"stage[{i}]", f"no later stage, result output or when uses an output of "
                                                   f"stage {stage.name}: it would run for nothing")

    def _check_ref(self, ref: object, *, key: str, earlier: set[str]) -> Reference:
        if not isinstance(ref, Reference):
            raise PipelineError(key, "expected a Reference")
        if Reference.parse(str(ref), key=key) != ref:  # the same rules as a reference read from text
            raise PipelineError(key, "a stage name cannot contain '.'")
        if not ref.is_event and ref.source not in earlier:
            later = any(s.name == ref.source for s in self.stages)
            raise PipelineError(key, f"{_show(ref.source)} is {'not an earlier stage' if later else 'no stage'}: "
                                     "a reference names event.<input> or an earlier stage's output")
        return ref

    def _check_result(self) -> None:
        if not isinstance(self.outputs, (tuple, list)) or not 1 <= len(self.outputs) <= MAX_RESULT_OUTPUTS:
            raise PipelineError("result.outputs", f"a result has 1-{MAX_RESULT_OUTPUTS} outputs")
        outputs = _sorted_pairs(self.outputs, key="result.outputs")
        all_stages = {s.name for s in self.stages}
        names: set[str] = set()
        for name, ref in outputs:
            if not _RESULT_NAME.fullmatch(name):
                raise PipelineError("result.outputs", "result names are 1-64 characters from A-Z a-z 0-9 _ . -")
            if name in names:
                raise PipelineError(f"result.outputs.{name}", "named twice")
            names.add(name)
            self._check_ref(ref, key=f"result.outputs.{name}", earlier=all_stages)
        object.__setattr__(self, "outputs", outputs)
        if self.when is not None:
            ref = self._check_ref(self.when, key="result.when", earlier=all_stages)
            if ref.is_event:
                raise PipelineError("result.when", "must be a stage output (a boolean computed in the enclave), "
                                                   "not an event input")

    @staticmethod
    def _keys(keys: object, key: str, check: Callable[..., bytes], *, minimum: int, maximum: int) -> tuple[bytes, ...]:
        if not isinstance(keys, (tuple, list)):
            raise PipelineError(key, "expected a list of public keys")
        if not minimum <= len(keys) <= maximum:
            raise PipelineError(key, f"expected {minimum}-{maximum} keys, got {len(keys)}")
        checked = [check(k, key=f"{key}[{i}]") for i, k in enumerate(keys)]
        if len(set(checked)) != len(checked):
            raise PipelineError(key, "the same key is listed twice")
        return tuple(sorted(checked))

    # -- derived

    @property
    def event_inputs(self) -> tuple[str, ...]:
        """The event input names the pipeline reads (every ``event.X``), sorted."""
        refs = [ref for stage in self.stages for _, ref in stage.inputs] + [ref for _, ref in self.outputs]
        return tuple(sorted({ref.name for ref in refs if ref.is_event}))

    @property
    def model_ids(self) -> tuple[str, ...]:
        """One model id per stage, in stage order (a model used by two stages appears twice)."""
        return tuple(stage.model for stage in self.stages)

    @property
    def source_binding_key(self) -> str:
        return amqp_binding_key(self.source_topic)

    @property
    def sink_routing_key(self) -> str:
        return amqp_binding_key(self.sink_topic)

    def allows(self, producer_key: bytes | None) -> bool:
        """May an event from a session that proved ``producer_key`` (None: proved none) run?"""
        return not self.producers or (producer_key is not None and producer_key in self.producers)

    # -- encoding

    def canonical(self) -> bytes:
        """The canonical msgpack encoding (what the owner signs, inside the definition)."""
        return pack({
            "v": SPEC_VERSION,
            "name": self.name,
            "desc": self.description,
            "src": [self.source_topic, self.source_exchange],
            "stages": [[s.name, s.model, [[n, str(r)] for n, r in s.inputs]] for s in self.stages],
            "out": [[n, str(r)] for n, r in self.outputs],
            "when": None if self.when is None else str(self.when),
            "sink": [self.sink_topic, self.sink_exchange],
            "rcpt": list(self.recipients),
            "prod": list(self.producers),
        })

    @classmethod
    def from_canonical(cls, data: bytes) -> PipelineSpec:
        """Decode and check a canonical spec (bounded); anything else is a ``MalformedMessage``."""
        what = "pipeline spec"
        try:
            m = unpack(data, max_bytes=MAX_SPEC_BYTES, what=what, max_depth=5, max_items=_SPEC_ITEMS,
                       max_container_len=MAX_PRODUCERS, max_str_len=4 * MAX_DESCRIPTION)
        except OversizedMessage as exc:
            raise MalformedMessage(str(exc)) from None
        keys = ("v", "name", "desc", "src", "stages", "out", "when", "sink", "rcpt", "prod")
        if not isinstance(m, dict) or tuple(m) != keys:
            raise MalformedMessage(f"{what}: expected the fields {', '.join(keys)} in that order")
        if m["v"] != SPEC_VERSION:
            raise MalformedMessage(f"{what}: unsupported spec version")
        try:
            spec = cls(
                name=m["name"], description=m["desc"],
                source_topic=_pair(m["src"], what)[0], source_exchange=_pair(m["src"], what)[1],
                stages=tuple(_stage(s, i, what) for i, s in enumerate(_list(m["stages"], what))),
                outputs=tuple(_mapping(m["out"], "result.outputs", what)),
                when=None if m["when"] is None else Reference.parse(m["when"], key="result.when"),
                sink_topic=_pair(m["sink"], what)[0], sink_exchange=_pair(m["sink"], what)[1],
                recipients=tuple(_list(m["rcpt"], what)), producers=tuple(_list(m["prod"], what)),
            )
        except PipelineError as exc:
            raise MalformedMessage(f"{what}: {exc}") from None
        if spec.canonical() != data:
            raise MalformedMessage(f"{what}: not in canonical form")
        return spec


# Objects in the largest canonical spec: the map and its 10 keys and 10 values, the two
# [topic, exchange] pairs, each stage ([name, model, inputs] + its (pair + 2 strings) inputs),
# each output pair, each key.
_SPEC_ITEMS = (1 + 20 + 2 * 2 + MAX_STAGES * (3 + 3 * MAX_STAGE_INPUTS) + 3 * MAX_RESULT_OUTPUTS
               + MAX_RECIPIENTS + MAX_PRODUCERS)


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise MalformedMessage(f"{what}: expected a list")
    return value


def _pair(value: Any, what: str) -> tuple[Any, Any]:
    if not isinstance(value, list) or len(value) != 2:
        raise MalformedMessage(f"{what}: expected a pair")
    return value[0], value[1]


def _mapping(value: Any, key: str, what: str) -> list[tuple[str, Reference]]:
    out = []
    for item in _list(value, what):
        name, text = _pair(item, what)
        if not isinstance(name, str):
            raise MalformedMessage(f"{what}: names must be text")
        out.append((name, Reference.parse(text, key=f"{key}.{_show(name)}")))
    return out


def _stage(value: Any, index: int, what: str) -> Stage:
    if not isinstance(value, list) or len(value) != 3:
        raise MalformedMessage(f"{what}: a stage is [name, model, inputs]")
    return Stage(name=value[0], model=value[1], inputs=tuple(_mapping(value[2], f"stage[{index}].inputs", what)))


# --------------------------------------------------------------------------- TOML


_TABLES: dict[str, tuple[frozenset[str], frozenset[str]]] = {  # table -> (required keys, optional keys)
    "pipeline": (frozenset({"name"}), frozenset({"description"})),
    "source": (frozenset({"topic"}), frozenset({"exchange"})),
    "result": (frozenset({"outputs"}), frozenset({"when"})),
    "sink": (frozenset({"topic"}), frozenset({"exchange"})),
    "access": (frozenset({"recipients"}), frozenset({"producers"})),
}
_STAGE_KEYS = frozenset({"name", "model", "inputs"})


def _only(table: Mapping[str, Any], allowed: frozenset[str], required: frozenset[str], where: str) -> None:
    for k in table:
        if k not in allowed:
            raise PipelineError(f"{where}.{_show(k)}" if where else _show(k), "unknown key")
    missing = sorted(required - set(table))
    if missing:
        raise PipelineError(f"{where}.{missing[0]}" if where else missing[0], "missing")


def _text(table: Mapping[str, Any], name: str, where: str, default: str | None = None) -> str:
    value = table.get(name, default)
    if not isinstance(value, str):
        raise PipelineError(f"{where}.{name}", "expected a string")
    return value


def _toml_mapping(value: Any, key: str) -> list[tuple[str, Reference]]:
    if not isinstance(value, dict):
        raise PipelineError(key, 'expected a table of name = "reference"')
    return [(name, Reference.parse(text, key=f"{key}.{_show(name)}")) for name, text in value.items()]


def _toml_keys(value: Any, key: str) -> tuple[bytes, ...]:
    if not isinstance(value, list):
        raise PipelineError(key, "expected a list of 64-hex public keys")
    if len(value) > MAX_PRODUCERS:  # before decoding each one; the spec checks the exact bound
        raise PipelineError(key, f"more than {MAX_PRODUCERS} keys")
    return tuple(_hex_key(item, key=f"{key}[{i}]") for i, item in enumerate(value))


def _read_bounded(path: Path, limit: int, *, key: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise PipelineError(key, f"no {what} at {path}") from None
    except IsADirectoryError:
        raise PipelineError(key, f"{path} is a directory, not a {what}") from None
    except OSError as exc:
        raise PipelineError(key, f"cannot read {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise PipelineError(key, f"{path} is larger than {limit} bytes")
    return data


def load_pipeline_toml(path: str | os.PathLike[str]) -> tuple[PipelineSpec, dict[str, bytes]]:
    """Read and check a pipeline.toml; returns the resolved spec and the model files it named.

    A stage ``model`` of 64 hex characters is a model id (already in the pool); anything else is
    a file path relative to the TOML's directory, read and replaced by its SHA-256 hex id. The
    returned dict maps each such id to the file's bytes (the CLI uploads them before the
    definition). Every problem is a ``PipelineError`` naming the TOML key."""
    path = Path(path)
    raw = _read_bounded(path, MAX_TOML_BYTES, key="", what="pipeline TOML file")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise PipelineError("", f"{path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message can quote the offending characters; keep its words and position only.
        reason = re.sub(r"'[^'\n]*'", "...", str(exc).splitlines()[0] if str(exc) else "syntax error")
        raise PipelineError("", f"{path} is not valid TOML: {reason}") from None
    _only(doc, frozenset(_TABLES) | {"stage"}, frozenset(_TABLES) | {"stage"}, "")
    tables: dict[str, dict[str, Any]] = {}
    for name, (required, optional) in _TABLES.items():
        if not isinstance(doc[name], dict):
            raise PipelineError(name, f"expected a [{name}] table")
        _only(doc[name], required | optional, required, name)
        tables[name] = doc[name]
    stages_doc = doc["stage"]
    if not isinstance(stages_doc, list) or not all(isinstance(s, dict) for s in stages_doc):
        raise PipelineError("stage", "expected [[stage]] tables")
    if len(stages_doc) > MAX_STAGES:
        raise PipelineError("stage", f"a pipeline has 1-{MAX_STAGES} [[stage]] tables")
    models: dict[str, bytes] = {}
    stages = []
    for i, s in enumerate(stages_doc):
        where = f"stage[{i}]"
        _only(s, _STAGE_KEYS, _STAGE_KEYS, where)
        model = _text(s, "model", where)
        if _HEX64.fullmatch(model):
            model_id = model.lower()
        else:
            model_id = _model_file(path.parent, model, key=f"{where}.model", models=models)
        stages.append(Stage(name=_text(s, "name", where), model=model_id,
                            inputs=tuple(_toml_mapping(s["inputs"], f"{where}.inputs"))))
    result, access = tables["result"], tables["access"]
    when = result.get("when")
    spec = PipelineSpec(
        name=_text(tables["pipeline"], "name", "pipeline"),
        description=_text(tables["pipeline"], "description", "pipeline", ""),
        source_topic=_text(tables["source"], "topic", "source"),
        source_exchange=_text(tables["source"], "exchange", "source", DEFAULT_SOURCE_EXCHANGE),
        stages=tuple(stages),
        outputs=tuple(_toml_mapping(result["outputs"], "result.outputs")),
        when=None if when is None else Reference.parse(when, key="result.when"),
        sink_topic=_text(tables["sink"], "topic", "sink"),
        sink_exchange=_text(tables["sink"], "exchange", "sink", DEFAULT_SINK_EXCHANGE),
        recipients=_toml_keys(access["recipients"], "access.recipients"),
        producers=_toml_keys(access.get("producers", []), "access.producers"),
    )
    return spec, models


def _model_file(base: Path, name: str, *, key: str, models: dict[str, bytes]) -> str:
    if not name or _CONTROL.search(name):
        raise PipelineError(key, "expected a model id (64 hex) or the path of an ONNX file")
    relative = Path(name)
    if relative.is_absolute():
        # A pipeline directory is self-contained (pipeline init writes one): paths are relative
        # to it, so the same TOML works wherever the directory is copied.
        raise PipelineError(key, "model files are named relative to the TOML's directory, not by absolute path")
    data = _read_bounded(base / relative, MAX_MODEL_FILE_BYTES, key=key, what="model file")
    if not data:
        raise PipelineError(key, f"{base / relative} is empty")
    model_id = hashlib.sha256(data).hexdigest()
    models[model_id] = data
    return model_id


# --------------------------------------------------------------------------- static type check


TensorSignature = tuple[str, Sequence[int | str | None] | None]   # (dtype, shape or None for unknown rank)
ModelSignature = tuple[Mapping[str, TensorSignature], Mapping[str, TensorSignature]]   # (inputs, outputs)


def _dtype(name: str) -> str:
    # Accept onnxruntime's "tensor(float)" as well as the wire names ("float32").
    if name == "tensor(string)":
        return "string"
    return ONNX_TYPES.get(name, name)


def _fixed(dim: object) -> int | None:
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 else None


def _shapes_fit(a: Sequence[int | str | None] | None, b: Sequence[int | str | None] | None) -> bool:
    if a is None or b is None:
        return True
    if len(a) != len(b):
        return False
    return all(_fixed(x) is None or _fixed(y) is None or x == y for x, y in zip(a, b))


def _describe(sig: TensorSignature) -> str:
    dtype, shape = sig
    dims = "?" if shape is None else "[" + ", ".join(str(d) if _fixed(d) is not None else "?" for d in shape) + "]"
    return f"{_dtype(dtype)}{dims}"


def check_stage_mapping(spec: PipelineSpec, signatures: Mapping[str, ModelSignature]) -> dict[str, TensorSignature]:
    """Type-check the spec's wiring against the real models; returns what each event input must be.

    ``signatures`` maps model id -> (inputs, outputs), each name -> (dtype, shape); dtypes as
    onnxruntime names them ("tensor(float)") or by wire name ("float32"); a dimension that is
    not a non-negative int is symbolic and matches anything, a shape of None any rank. Raises
    ``UnknownStageModel`` for a model not in ``signatures`` and ``StageMappingError`` when a
    referenced output does not exist, a model input is unmapped or unknown, dtypes differ,
    ranks differ or fixed dimensions differ, two uses of one event input disagree, or ``when``
    is not one boolean. The returned signatures -- dtypes by wire name ("float32", "string"),
    shapes as lists, a fixed dimension winning over a symbolic one when an event input feeds
    two inputs -- are what a worker checks each event against."""
    produced: dict[tuple[str, str], TensorSignature] = {}
    events: dict[str, TensorSignature] = {}

    def source_of(ref: Reference, key: str, wanted: TensorSignature | None) -> TensorSignature | None:
        if ref.is_event:
            if wanted is not None:
                have = events.get(ref.name)
                if have is not None:
                    if _dtype(have[0]) != _dtype(wanted[0]) or not _shapes_fit(have[1], wanted[1]):
                        raise StageMappingError(key, f"event.{ref.name} is also used as {_describe(have)}, "
                                                     f"here as {_describe(wanted)}")
                    events[ref.name] = (_dtype(have[0]), _merge(have[1], wanted[1]))
                else:
                    events[ref.name] = (_dtype(wanted[0]), None if wanted[1] is None else list(wanted[1]))
            return None
        sig = produced.get((ref.source, ref.name))
        if sig is None:
            raise StageMappingError(key, f"stage {ref.source} has no output {_show(ref.name)}")
        return sig

    for i, stage in enumerate(spec.stages):
        where = f"stage[{i}]"
        if stage.model not in signatures:
            raise UnknownStageModel(f"{where}.model", f"model {stage.model} is not in the pool")
        inputs, outputs = signatures[stage.model]
        mapped = dict(stage.inputs)
        for name in mapped:
            if name not in inputs:
                raise StageMappingError(f"{where}.inputs.{_show(name)}", f"model {stage.model[:12]} has no such input")
        for name, wanted in inputs.items():
            key = f"{where}.inputs.{_show(name)}"
            if name not in mapped:
                raise StageMappingError(key, f"input of model {stage.model[:12]} is not mapped")
            have = source_of(mapped[name], key, wanted)
            if have is None:
                continue
            if _dtype(have[0]) != _dtype(wanted[0]):
                raise StageMappingError(key, f"{_show(str(mapped[name]))} is {_dtype(have[0])}, the input is {_dtype(wanted[0])}")
            if not _shapes_fit(have[1], wanted[1]):
                raise StageMappingError(key, f"{_show(str(mapped[name]))} is {_describe(have)}, the input is {_describe(wanted)}")
        for name, sig in outputs.items():
            produced[(stage.name, name)] = sig
    for name, ref in spec.outputs:
        source_of(ref, f"result.outputs.{name}", None)
    if spec.when is not None:
        cond = source_of(spec.when, "result.when", None)
        if cond is None:  # PipelineSpec already refuses an event reference here
            raise StageMappingError("result.when", "must be a stage output")
        if _dtype(cond[0]) != "bool":
            raise StageMappingError("result.when", f"{_show(str(spec.when))} is {_dtype(cond[0])}, not bool")
        if cond[1] is not None and any(_fixed(d) not in (None, 1) for d in cond[1]):
            raise StageMappingError("result.when", f"{_show(str(spec.when))} is {_describe(cond)}, not one boolean")
    return events


def _merge(a: Sequence[int | str | None] | None, b: Sequence[int | str | None] | None) -> Sequence[int | str | None] | None:
    if a is None:
        return b
    if b is None:
        return a
    return [x if _fixed(x) is not None else y for x, y in zip(a, b)]


# --------------------------------------------------------------------------- signed statements


@dataclass(frozen=True)
class SignedPipeline:
    """An owner-signed pipeline definition. ``from_bytes`` parses *and verifies*; ``verify``
    re-checks an object built in memory. ``pipeline_id`` is derived from owner key and name."""

    spec: PipelineSpec
    owner_key: bytes
    issued_ms: int
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.spec, PipelineSpec):
            raise MalformedMessage(f"{DEFINITION_KIND}: expected a PipelineSpec")
        _public_key(self.owner_key, what=DEFINITION_KIND, name="owner_key")
        _uint(self.issued_ms, what=DEFINITION_KIND, name="issued_ms")
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_BYTES:
            raise MalformedMessage(f"{DEFINITION_KIND}: signature must be {SIGNATURE_BYTES} bytes")

    @property
    def pipeline_id(self) -> str:
        return pipeline_id(self.owner_key, self.spec.name)

    @staticmethod
    def signed_bytes(spec: PipelineSpec, owner_key: bytes, issued_ms: int) -> bytes:
        return pack([DEFINITION_LABEL, pipeline_id(owner_key, spec.name), owner_key, issued_ms, spec.canonical()])

    def verify(self) -> None:
        """Raise ``SignatureInvalid`` unless the owner key signed exactly this definition."""
        _verify(self.owner_key, self.signature, self.signed_bytes(self.spec, self.owner_key, self.issued_ms),
                what=DEFINITION_KIND)

    def to_bytes(self) -> bytes:
        return _signed_form(DEFINITION_KIND, self.signed_bytes(self.spec, self.owner_key, self.issued_ms),
                            self.signature)

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedPipeline:
        """Parse a signed definition (bounded) and verify its signature: ``MalformedMessage`` or
        ``SignatureInvalid``, nothing else."""
        items, message, signature = _open_signed(data, kind=DEFINITION_KIND, label=DEFINITION_LABEL, arity=5,
                                                 max_bytes=MAX_SIGNED_PIPELINE_BYTES)
        pid, owner, issued, spec_bytes = items[1:]
        if not isinstance(spec_bytes, bytes):
            raise MalformedMessage(f"{DEFINITION_KIND}: the spec must be bytes")
        signed = cls(spec=PipelineSpec.from_canonical(spec_bytes), owner_key=owner, issued_ms=issued,
                     signature=signature)
        if pid != signed.pipeline_id:
            raise MalformedMessage(f"{DEFINITION_KIND}: the pipeline id is not derived from the owner key and name")
        if message != signed.signed_bytes(signed.spec, signed.owner_key, signed.issued_ms):
            raise MalformedMessage(f"{DEFINITION_KIND}: signed part is not in canonical form")
        signed.verify()
        return signed

    def replaces(self, current: SignedPipeline | None) -> bool:
        """Should a worker holding ``current`` (None: nothing) install this definition? Only a
        strictly newer one of the same pipeline id -- hence of the same owner. A worker also
        refuses a definition not newer than a delete order it keeps for the id."""
        return current is None or (self.pipeline_id == current.pipeline_id and self.issued_ms > current.issued_ms)


def sign_pipeline(spec: PipelineSpec, owner_private_key: Ed25519PrivateKey, issued_ms: int) -> SignedPipeline:
    owner = public_key_bytes(owner_private_key)
    _uint(issued_ms, what=DEFINITION_KIND, name="issued_ms")
    signature = owner_private_key.sign(SignedPipeline.signed_bytes(spec, owner, issued_ms))
    return SignedPipeline(spec=spec, owner_key=owner, issued_ms=issued_ms, signature=signature)


@dataclass(frozen=True)
class PipelineDelete:
    """The owner's order to delete a pipeline from every worker of the pool.

    It carries no name, so a worker checks ``owner_key`` against the owner of the definition it
    holds (``deletes``), and keeps the order so that a definition signed earlier, replayed
    later, is refused."""

    pipeline_id: str
    owner_key: bytes
    issued_ms: int
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.pipeline_id, str) or not _MODEL_ID.fullmatch(self.pipeline_id):
            raise MalformedMessage(f"{DELETE_KIND}: pipeline_id must be 64 lowercase hex characters")
        _public_key(self.owner_key, what=DELETE_KIND, name="owner_key")
        _uint(self.issued_ms, what=DELETE_KIND, name="issued_ms")
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_BYTES:
            raise MalformedMessage(f"{DELETE_KIND}: signature must be {SIGNATURE_BYTES} bytes")

    @staticmethod
    def signed_bytes(pipeline_id: str, owner_key: bytes, issued_ms: int) -> bytes:
        return pack([DELETE_LABEL, pipeline_id, owner_key, issued_ms])

    def verify(self) -> None:
        _verify(self.owner_key, self.signature, self.signed_bytes(self.pipeline_id, self.owner_key, self.issued_ms),
                what=DELETE_KIND)

    def to_bytes(self) -> bytes:
        return _signed_form(DELETE_KIND, self.signed_bytes(self.pipeline_id, self.owner_key, self.issued_ms),
                            self.signature)

    @classmethod
    def from_bytes(cls, data: bytes) -> PipelineDelete:
        """Parse a signed delete order (bounded) and verify its signature."""
        items, message, signature = _open_signed(data, kind=DELETE_KIND, label=DELETE_LABEL, arity=4,
                                                 max_bytes=MAX_DELETE_BYTES)
        order = cls(pipeline_id=items[1], owner_key=items[2], issued_ms=items[3], signature=signature)
        if message != order.signed_bytes(order.pipeline_id, order.owner_key, order.issued_ms):
            raise MalformedMessage(f"{DELETE_KIND}: signed part is not in canonical form")
        order.verify()
        return order

    def deletes(self, current: SignedPipeline) -> bool:
        """Does this order delete ``current``: same id, same owner, signed after it?"""
        return (self.pipeline_id == current.pipeline_id and self.owner_key == current.owner_key
                and self.issued_ms > current.issued_ms)


def sign_pipeline_delete(pipeline_id: str, owner_private_key: Ed25519PrivateKey, issued_ms: int) -> PipelineDelete:
    owner = public_key_bytes(owner_private_key)
    if not isinstance(pipeline_id, str) or not _MODEL_ID.fullmatch(pipeline_id):
        raise MalformedMessage(f"{DELETE_KIND}: pipeline_id must be 64 lowercase hex characters")
    _uint(issued_ms, what=DELETE_KIND, name="issued_ms")
    signature = owner_private_key.sign(PipelineDelete.signed_bytes(pipeline_id, owner, issued_ms))
    return PipelineDelete(pipeline_id=pipeline_id, owner_key=owner, issued_ms=issued_ms, signature=signature)

