"""`enclaveq pool status` (issue 16): every attested member answers for itself, over the sealed
channel, and the producer collects the answers of all members that reply within a short window.

- each member reports its own id, platform, measurement, epoch, models, pipelines and load;
  the SDK keeps one answer per member, so a broker delivering an answer twice adds no row;
- the other kinds keep their first-answer semantics (an upload still completes once);
- an answer a member seals but that does not decode is skipped and counted, one from outside
  the pool does not even open, and text a member sends never reaches the terminal as escapes;
- models hidden from a producer by their owner's allow-list stay hidden here too (count included);
- a producer whose policy refuses the pool learns nothing: no status request is ever sent.
"""

from __future__ import annotations

import asyncio
import json
import os

import msgpack
import numpy as np
import pytest
from click.testing import CliRunner, Result

from attestation.policy import write_policy
from broker_adapters import Message, open_broker
from enclave_worker.config import DEFAULT_WORKER_CONFIG
from enclave_worker.request_handlers import Answer
from enclaveq.cli import cli
from producer_sdk import AsyncClient
from protocol import bodies, crypto
from protocol.envelope import peek_request, seal_result
from protocol.errors import ProtocolError
from protocol.handshake import SEALED_REQUEST, control_kind
from protocol.ownership import generate_signing_key, public_key_bytes

from .support import mlp_model, running_worker, wait_until

WAIT = 1.5  # seconds the producer collects answers: in-process and local brokers answer in milliseconds


def status_requests(worker) -> float:
    return sum(worker.metrics.registry.get_sample_value(
        "enclaveq_worker_requests_total", {"kind": "pool_status", "outcome": outcome}) or 0.0
        for outcome in ("ok", "unsupported", "bad_input", "internal"))


async def enclaveq(*args: str) -> Result:
    """The command in this process (the memory broker lives here), off the workers' event loop."""
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args))


# --------------------------------------------------------------------------- the SDK


async def test_every_member_answers_with_its_epoch_models_and_load(tee, broker_url, pool, tmp_path):
    async with running_worker(tee, broker_url, pool, worker_id="w-alpha") as alpha, \
            running_worker(tee, broker_url, pool, worker_id="w-beta", state_dir=tmp_path / "beta") as beta:
        async with AsyncClient(broker_url, pool, tee.policy(), timeout=30) as client:
            model_id = await client.upload_model(mlp_model())  # a broadcast: still done at the first answer
            await wait_until(lambda: alpha.models.has(model_id) and beta.models.has(model_id), "both hold the model")
            await client.run(model_id, {"x": np.ones((1, 4), np.float32), "bias": np.zeros(3, np.float32)})
            members = await client.pool_status(WAIT)
            assert [m.model_id for m in await client.list_models()] == [model_id]  # first answer, as before
            epoch = client.statement.epoch
    assert [m.worker_id for m in members] == ["w-alpha", "w-beta"]
    for m in members:
        assert (m.platform, m.measurement, m.epoch) == ("sim", tee.measurement, epoch)
        assert (m.model_count, m.model_ids, m.pipelines) == (1, (model_id,), 0)
        assert (m.jobs_in_flight, m.max_jobs_in_flight) == (0, DEFAULT_WORKER_CONFIG.max_jobs_in_flight)
        assert m.max_batch_rows == DEFAULT_WORKER_CONFIG.max_batch_rows and m.ready
        assert m.jobs_failed == 0 and m.uptime_seconds >= 0
    assert sum(m.jobs_ok for m in members) == 1  # the one job ran on one member


async def test_an_answer_the_broker_delivers_twice_is_one_member(tee, broker_url, pool, tmp_path):
    async with running_worker(tee, broker_url, pool, worker_id="w-alpha") as alpha, \
            running_worker(tee, broker_url, pool, worker_id="w-beta", state_dir=tmp_path / "beta"):
        publish = alpha._broker.publish_reply

        async def twice(address: str, message: Message) -> None:
            await publish(address, message)
            await publish(address, message)
        alpha._broker.publish_reply = twice  # type: ignore[method-assign]
        async with AsyncClient(broker_url, pool, tee.policy(), timeout=30) as client:
            members = await client.pool_status(WAIT)
            assert client.skipped_status_answers == 0
    assert [m.worker_id for m in members] == ["w-alpha", "w-beta"]


async def test_an_undecodable_answer_is_skipped_and_a_forged_one_does_not_open(tee, broker_url, pool, tmp_path):
    """A member (buggy, or compromised) seals garbage; someone outside the pool answers with a
    status sealed under a key of its own. The genuine members are listed, nothing else."""
    async def garbage(header, plaintext) -> Answer:
        return Answer("ok", bodies.MEMBER_STATUS, b"\x81\xa6worker\xc4\x03bad")  # a map, but bytes for the id

    async def forge(delivery) -> None:  # outside the pool: sees the clear header, not the session key
        body = delivery.message.body
        if control_kind(body, max_bytes=1 << 20) == SEALED_REQUEST:
            _, header = peek_request(body)
            status = bodies.MemberStatus("forged", "sim", tee.measurement, 99, 0, (), 0, 0, 1, 0, 0, 0, 1, True)
            forged = seal_result(crypto.SessionSecret(os.urandom(32)), header, "ok", bodies.MEMBER_STATUS,
                                 bodies.encode_member_status(status))
            await outsider.publish_reply(header.reply_to, Message(body=forged, correlation_id=header.job_id))
        await delivery.ack()

    async with running_worker(tee, broker_url, pool, worker_id="w-alpha"), \
            running_worker(tee, broker_url, pool, worker_id="w-broken", state_dir=tmp_path / "broken") as broken:
        broken._handlers._handlers["pool_status"] = garbage
        async with open_broker(broker_url) as outsider:
            sub = await outsider.consume_control(pool, forge)
            async with AsyncClient(broker_url, pool, tee.policy(), timeout=30) as client:
                members = await client.pool_status(WAIT)
                assert client.skipped_status_answers == 1
                assert client._core.unopenable >= 1  # the forgery reached the producer, and did not open
            await sub.cancel()
    assert [m.worker_id for m in members] == ["w-alpha"]


async def test_a_model_hidden_by_its_allow_list_is_not_shown_nor_counted(tee, memory_url, pool):
    allowed = generate_signing_key()
    async with running_worker(tee, memory_url, pool):
        async with AsyncClient(memory_url, pool, tee.policy(), timeout=30, producer_key=allowed) as owner:
            model_id = await owner.upload_model(mlp_model(), allowed_producers=[public_key_bytes(allowed)])
            [seen] = await owner.pool_status(WAIT)
        async with AsyncClient(memory_url, pool, tee.policy(), timeout=30) as stranger:
            [unseen] = await stranger.pool_status(WAIT)
    assert (seen.model_count, seen.model_ids) == (1, (model_id,))
    assert (unseen.model_count, unseen.model_ids) == (0, ())


async def test_a_worker_that_does_not_know_the_request_is_skipped_and_none_answering_is_an_empty_list(
        tee, memory_url, pool):
    async with running_worker(tee, memory_url, pool) as old:
        del old._handlers._handlers["pool_status"]  # a worker from before pool_status: "unsupported"
        async with AsyncClient(memory_url, pool, tee.policy(), timeout=30) as client:
            assert await client.pool_status(WAIT) == []
            assert client.skipped_status_answers == 1
    with pytest.raises(ValueError):
        await AsyncClient(memory_url, pool, tee.policy()).pool_status(0)


# --------------------------------------------------------------------------- the command line


@pytest.fixture
def policy_file(tmp_path, tee):
    return write_policy(tmp_path / "policy.toml", tee.policy())


async def test_the_command_prints_a_row_per_member_and_json_that_parses(tee, broker_url, pool, tmp_path,
                                                                         policy_file):
    conn = ["--broker", broker_url, "--pool", pool, "--policy", str(policy_file)]
    async with running_worker(tee, broker_url, pool, worker_id="w-alpha"), \
            running_worker(tee, broker_url, pool, worker_id="w-beta", state_dir=tmp_path / "beta"):
        table = await enclaveq("pool", "status", *conn, "--wait", str(WAIT))
        as_json = await enclaveq("pool", "status", *conn, "--wait", str(WAIT), "--json")
    assert table.exit_code == 0, table.output
    rows = [line for line in table.stdout.splitlines() if line.startswith("w-")]
    assert [row.split()[0] for row in rows] == ["w-alpha", "w-beta"]
    assert all(row.split()[1] == "sim" for row in rows)
    assert "2 members of pool" in table.stderr
    assert as_json.exit_code == 0, as_json.output
    doc = json.loads(as_json.stdout)
    assert [m["worker"] for m in doc["members"]] == ["w-alpha", "w-beta"] and doc["skipped"] == 0
    assert {m["measurement"] for m in doc["members"]} == {tee.measurement.hex()}
    assert {m["epoch"] for m in doc["members"]} == {doc["epoch"]}


async def test_the_command_fails_in_one_line_when_no_member_answers(tee, memory_url, pool, policy_file):
    async with running_worker(tee, memory_url, pool) as old:
        del old._handlers._handlers["pool_status"]
        result = await enclaveq("pool", "status", "--broker", memory_url, "--pool", pool,
                                "--policy", str(policy_file), "--wait", str(WAIT))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"error: no member of pool {pool!r} answered the status request within {WAIT:g}s" in result.stderr
    assert "1 answer did not decode and was skipped" in result.stderr


async def test_a_producer_whose_policy_refuses_the_pool_learns_nothing(tee, broker_url, pool, tmp_path):
    refusing = write_policy(tmp_path / "other.toml", tee.policy(measurements=("00" * 32,)))
    seen: list[str] = []

    async def spy(delivery) -> None:
        seen.append(control_kind(delivery.message.body, max_bytes=1 << 20))
        await delivery.ack()

    async with running_worker(tee, broker_url, pool, worker_id="w-alpha") as worker:
        async with open_broker(broker_url) as observer:
            sub = await observer.consume_control(pool, spy)
            result = await enclaveq("pool", "status", "--broker", broker_url, "--pool", pool,
                                    "--policy", str(refusing), "--wait", str(WAIT), "--json", "--timeout", "10")
            await wait_until(lambda: "challenge" in seen, "the challenge was seen on the control channel")
            await asyncio.sleep(WAIT)  # a status request, had one been sent, would be here by now
            await sub.cancel()
        assert status_requests(worker) == 0
    assert result.exit_code == 1
    assert "attestation refused" in result.stderr
    assert "w-alpha" not in result.output and result.stdout == ""
    assert SEALED_REQUEST not in seen


async def test_rich_markup_or_escapes_in_a_member_id_never_reach_the_terminal(tee, memory_url, pool, policy_file):
    async with running_worker(tee, memory_url, pool, worker_id="[bold red]w[/]"):
        result = await enclaveq("pool", "status", "--broker", memory_url, "--pool", pool,
                                "--policy", str(policy_file), "--wait", str(WAIT))
    assert result.exit_code == 0, result.output
    assert "[bold red]w[/]" in result.stdout  # shown as sent, not interpreted


# --------------------------------------------------------------------------- the body's decoder


def status(**changes) -> bodies.MemberStatus:
    fields = dict(worker_id="w-1", platform="sim", measurement=bytes(32), epoch=3, model_count=1,
                  model_ids=("ab" * 32,), pipelines=2, jobs_in_flight=1, max_jobs_in_flight=8, jobs_ok=10,
                  jobs_failed=1, uptime_seconds=60, max_batch_rows=64, ready=True)
    fields.update(changes)
    return bodies.MemberStatus(**fields)  # type: ignore[arg-type]


def wire(**changes) -> bytes:
    m = msgpack.unpackb(bodies.encode_member_status(status()))
    m.update(changes)
    return msgpack.packb(m, use_bin_type=True)


def test_a_status_round_trips():
    assert bodies.decode_member_status(bodies.encode_member_status(status())) == status()
    many = tuple(f"{i:064x}" for i in range(bodies.MAX_STATUS_MODELS + 5))
    listed = bodies.decode_member_status(bodies.encode_member_status(status(model_ids=many, model_count=len(many))))
    assert (listed.model_count, len(listed.model_ids)) == (len(many), bodies.MAX_STATUS_MODELS)


@pytest.mark.parametrize("changes", [
    {"worker": "w\x1b[2J"},                                  # a terminal escape sequence
    {"worker": ""}, {"worker": "w" * (bodies.MAX_WORKER_ID_LEN + 1)}, {"worker": b"w"},
    {"platform": "s" * (bodies.MAX_PLATFORM_LEN + 1)},
    {"measurement": b""}, {"measurement": bytes(bodies.MAX_MEASUREMENT_BYTES + 1)},
    {"epoch": -1}, {"epoch": True}, {"ok": (1 << 64) - 1}, {"in_flight": "1"}, {"uptime_s": None},
    {"ready": 1}, {"ready": None},
    {"models": ["AB" * 32]}, {"models": ["ab"]}, {"models": "ab" * 32},
    {"models": ["ab" * 32] * (bodies.MAX_STATUS_MODELS + 1), "model_count": bodies.MAX_STATUS_MODELS + 1},
    {"model_count": 0},                                      # fewer than the ids listed
], ids=repr)
def test_a_status_that_breaks_a_rule_is_refused(changes):
    with pytest.raises(ProtocolError):
        bodies.decode_member_status(wire(**changes))


@pytest.mark.parametrize("body", [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"models": [[[[1]]]]}),
                                  b"\x81" + msgpack.packb("x" * (bodies.MEMBER_STATUS_MAX_BYTES + 1))])
def test_bytes_that_are_not_a_status_are_refused_as_protocol_errors(body):
    with pytest.raises(ProtocolError):
        bodies.decode_member_status(body)


def test_random_and_mutated_bodies_only_ever_raise_protocol_errors():
    import random
    rng = random.Random(16)
    valid = bodies.encode_member_status(status())
    for _ in range(3000):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        for candidate in (bytes(data), rng.randbytes(rng.randint(0, 64))):
            try:
                bodies.decode_member_status(candidate)
            except ProtocolError:
                pass
