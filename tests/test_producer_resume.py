"""A batch outlives its producer (issue 16, fault 3): `enclaveq submit` killed with SIGKILL and run
again finishes the batch; ``submit(..., resume=journal)`` does the same in the SDK. Results that
reached the batch's durable reply queue while nobody listened are collected, only jobs without a
result are sent again, and a worker's replay guard keeps a job sent again under its first id from
running twice. Plus the journal itself: what it keeps, how it refuses damage, who may read it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import signal
import sys

import aio_pika
import numpy as np
import pytest

from broker_adapters import _common as common
from broker_adapters import open_broker
from enclaveq.cli.npz_files import read_npz
from producer_sdk import AsyncClient, JobResult
from producer_sdk.errors import BatchJournalError
from producer_sdk.journal import BatchJournal, SentRequest, SessionRecord

from bench.backpressure import slow_model

from .processes import ROOT, enclaveq
from .support import batch_of, mlp_model, run_directly, running_worker, wait_until

SESSION = SessionRecord(session_id=b"s" * 16, epoch=3, sealed_session=b"sealed", key=b"k" * 32)


def _frame(request_id: str, *indexes: int, deadline_ms: int = 10**13) -> SentRequest:
    return SentRequest(request_id, True, SESSION.session_id, deadline_ms,
                       tuple((index, f"{request_id}-{index}") for index in indexes))


def _slow_batch(n: int) -> list[dict[str, np.ndarray]]:
    return [{"x": np.full((1, 16), i / n, np.float32)} for i in range(n)]


def _ran(worker) -> float:
    return worker.metrics.requests.labels("job", "ok")._value.get()


def _same_as_direct(model: bytes, inputs: dict, outputs: dict) -> bool:
    expected = run_directly(model, inputs)
    return all(np.allclose(outputs[name], value) for name, value in expected.items())


# -- the journal -------------------------------------------------------------------------------

def test_a_journal_read_again_plans_what_is_left_of_the_batch(tmp_path):
    journal = BatchJournal(tmp_path / "j", batch="b1")
    journal.start(pool="p", model_id="m", reply_queue="batch-q")
    journal.record_session(SESSION)
    for request in (_frame("f1", 0, 1, 2), _frame("f2", 3, 4), _frame("f3", 5)):
        journal.record_sent(request)
    journal.record_answered("f1")
    journal.record_answered("f3")
    journal.kept(0)
    journal.kept(5, 0)  # many at once (one write), an index kept twice written once
    journal.close()
    assert (tmp_path / "j").read_text().count('{"kept":') == 2

    again = BatchJournal(tmp_path / "j", batch="b1")
    plan = again.plan()
    assert (again.pool, again.model_id, again.reply_queue) == ("p", "m", "batch-q")
    assert [s.key for s in again.sessions()] == [SESSION.key]
    assert [r.request_id for r in plan.resend] == ["f2"]  # never answered: sent again under its id
    assert plan.fresh == {1, 2}  # answered to the dead process, not kept: sent anew
    assert again.is_kept(0) and again.is_kept(5) and not again.is_kept(3)
    assert again.jobs_sent == 6


def test_a_job_sent_again_anew_counts_under_its_last_request(tmp_path):
    journal = BatchJournal(tmp_path / "j")
    journal.start(pool="p", model_id="m", reply_queue="batch-q")
    journal.record_session(SESSION)
    journal.record_sent(_frame("f1", 0, 1))
    journal.record_answered("f1")
    journal.record_sent(_frame("f2", 1))  # job 1 sent anew by a resumed run
    journal.close()
    plan = BatchJournal(tmp_path / "j").plan()
    assert [r.request_id for r in plan.resend] == ["f2"] and plan.fresh == {0}


def test_a_record_torn_by_a_crash_is_dropped_and_the_journal_goes_on(tmp_path):
    journal = BatchJournal(tmp_path / "j")
    journal.start(pool="p", model_id="m", reply_queue="batch-q")
    journal.record_session(SESSION)
    journal.record_sent(_frame("f1", 0))
    journal.close()
    with open(tmp_path / "j", "ab") as file:
        file.write(b'{"sent":["f2",true,"73')  # the process died in the middle of this write
    again = BatchJournal(tmp_path / "j")
    assert [r.request_id for r in again.plan().resend] == ["f1"]
    again.kept(0)
    again.close()
    assert BatchJournal(tmp_path / "j").is_kept(0)  # the next record starts on a line of its own


@pytest.mark.parametrize("damage", [b"not json\n", b'{"sent":["f",true,"zz",1,[[0,"a"]]]}\n', b'{"what":1}\n',
                                    b'{"kept":-1}\n', b"[1,2]\n"])
def test_a_damaged_journal_is_refused_naming_the_file_and_line(tmp_path, damage):
    journal = BatchJournal(tmp_path / "j")
    journal.start(pool="p", model_id="m", reply_queue="batch-q")
    journal.close()
    with open(tmp_path / "j", "ab") as file:
        file.write(damage)
    with pytest.raises(BatchJournalError, match=r"j: line 2 is not a batch journal record"):
        BatchJournal(tmp_path / "j")


def test_a_journal_of_another_batch_pool_or_model_is_refused(tmp_path):
    journal = BatchJournal(tmp_path / "j", batch="inputs-1")
    journal.start(pool="p", model_id="m", reply_queue="batch-q")
    journal.close()
    with pytest.raises(BatchJournalError, match="another batch"):
        BatchJournal(tmp_path / "j", batch="inputs-2")
    same = BatchJournal(tmp_path / "j", batch="inputs-1")
    with pytest.raises(BatchJournalError, match="for model 'm', not 'other'"):
        same.check(pool="p", model_id="other")
    with pytest.raises(BatchJournalError, match="for pool 'p', not 'q'"):
        same.check(pool="q", model_id="m")


def test_the_journal_holding_session_keys_is_private_and_never_followed_through_a_symlink(tmp_path):
    journal = BatchJournal(tmp_path / "j")
    journal.start(pool="p", model_id="m", reply_queue="batch-q")
    journal.record_session(SESSION)
    journal.close()
    assert (tmp_path / "j").stat().st_mode & 0o777 == 0o600
    assert SESSION.key.hex() not in repr(SESSION)
    (tmp_path / "link").symlink_to(tmp_path / "j")
    with pytest.raises(BatchJournalError, match="symlink"):
        BatchJournal(tmp_path / "link")
    planted = BatchJournal(tmp_path / "new-link")
    (tmp_path / "new-link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BatchJournalError, match="exists already"):
        planted.start(pool="p", model_id="m", reply_queue="batch-q")
    assert not (tmp_path / "elsewhere").exists()


# -- the SDK -----------------------------------------------------------------------------------

async def _take(client: AsyncClient, model_id: str, batch: list, journal, count: int | None = None,
                **kwargs) -> dict[int, JobResult]:
    """Submit with a journal; stop after ``count`` results (the producer goes away)."""
    taken: dict[int, JobResult] = {}
    async with contextlib.aclosing(client.submit(model_id, batch, resume=journal, **kwargs)) as results:
        async for result in results:
            assert result.index not in taken, f"job {result.index} yielded twice in one run"
            taken[result.index] = result
            if len(taken) == count:
                break
    return taken


async def test_a_resumed_batch_collects_what_arrived_meanwhile_and_runs_each_job_once(tee, broker_url, pool,
                                                                                        tmp_path):
    # A worker slower than the producer (one job at a time), so jobs are still queued when it stops.
    model, batch, path = slow_model(384), _slow_batch(300), tmp_path / "batch.journal"
    async with running_worker(tee, broker_url, pool, prefetch=1) as worker:
        # Deadlines far away: a result the second run failed to collect would be waited for until
        # then (its copy is dropped by the worker), far beyond the bound put on the second run.
        async with AsyncClient(broker_url, pool, tee.policy(), timeout=600) as client:
            model_id = await client.upload_model(model)
            first = await _take(client, model_id, batch, path, count=100, max_in_flight=64)
        # The producer is gone; the jobs it sent still run, their results wait in the batch's queue.
        sent = BatchJournal(path).jobs_sent
        assert 100 < sent < 300
        await wait_until(lambda: _ran(worker) == sent, "the worker answered every job the first run sent")

        journal = BatchJournal(path)
        async with AsyncClient(broker_url, pool, tee.policy()) as client:
            second = await asyncio.wait_for(_take(client, model_id, batch, journal, max_in_flight=64), 120)
        # Every request of the first run was answered into the queue: each came back from there,
        # before or after a copy was sent (the worker dropped the copies: it ran nothing twice).
        assert journal.collected + journal.resent > 0
        # The result the first run was handling when it stopped is yielded again (at least once).
        assert len(set(first) & set(second)) <= 1 and set(first) | set(second) == set(range(300))
        # Only jobs whose result the dead producer had taken and not kept ran twice.
        assert _ran(worker) == 300 + journal.sent_anew
        assert journal.sent_anew <= 64 + 1
    for index, result in second.items():
        assert result.ok and _same_as_direct(model, batch[index], result.outputs), index
    assert not path.exists(), "the completed batch's journal (and its session keys) is deleted"


async def test_jobs_still_queued_when_the_producer_died_are_sent_again_under_their_id_and_run_once(
        tee, memory_url, pool, tmp_path):
    # A slow worker taking one job at a time: when the producer dies, most of what it sent is still
    # queued. The resumed producer sends copies under the first ids, behind the originals; the
    # worker runs each original and drops each copy (its replay guard).
    model, batch, path = slow_model(1536), _slow_batch(200), tmp_path / "batch.journal"
    async with running_worker(tee, memory_url, pool, prefetch=1) as worker:
        async with AsyncClient(memory_url, pool, tee.policy()) as client:
            model_id = await client.upload_model(model)
            first = await _take(client, model_id, batch, path, count=10, max_in_flight=128, frames=False)
        journal = BatchJournal(path)
        async with AsyncClient(memory_url, pool, tee.policy()) as client:
            second = await _take(client, model_id, batch, journal, max_in_flight=128, frames=False)
        duplicates = worker.metrics.requests.labels("job", "duplicate")
        assert journal.resent > 0, "no copy was sent while its original was queued"
        await wait_until(lambda: duplicates._value.get() > 0, "the worker dropped a copy")
        assert _ran(worker) == 200 + journal.sent_anew
    assert set(first) | set(second) == set(range(200))
    assert all(result.ok for result in second.values())


async def test_results_taken_but_not_kept_are_computed_again_at_once(tee, memory_url, pool, tmp_path):
    model, batch, path = mlp_model(), batch_of(120), tmp_path / "batch.journal"
    async with running_worker(tee, memory_url, pool) as worker:
        async with AsyncClient(memory_url, pool, tee.policy(), timeout=600) as client:
            model_id = await client.upload_model(model)
            # The caller never stored (kept) anything: a crash before it wrote its results.
            first = await _take(client, model_id, batch, BatchJournal(path, auto_keep=False), count=60,
                                max_in_flight=32)
            await wait_until(lambda: _ran(worker) == BatchJournal(path).jobs_sent, "the sent jobs ran")
            journal = BatchJournal(path, auto_keep=False)
            second = await _take(client, model_id, batch, journal, max_in_flight=32)
    # Answered to the first run: sending them again under their first id would only be dropped by
    # the worker, so they go anew at once rather than after their 600 s deadline.
    assert journal.sent_anew >= len(first) and journal.resent == 0
    assert set(second) == set(range(120))


async def test_a_journal_resumed_for_another_model_is_refused_before_anything_is_sent(tee, memory_url, pool,
                                                                                         tmp_path):
    path = tmp_path / "batch.journal"
    async with running_worker(tee, memory_url, pool), AsyncClient(memory_url, pool, tee.policy()) as client:
        model_id = await client.upload_model(mlp_model())
        await _take(client, model_id, batch_of(20), path, count=5)
        with pytest.raises(BatchJournalError, match="not 'other"):
            await _take(client, "other" + model_id[5:], batch_of(20), path)
        # Still the batch's journal: completed, its queue and file are gone.
        await _take(client, model_id, batch_of(20), path)
    assert not path.exists()


# -- the CLI, killed ---------------------------------------------------------------------------

async def _queue_length(url: str, queue: str) -> int:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await connection.close()


async def test_submit_killed_mid_batch_and_run_again_finishes_it_running_each_job_once(tee, rabbitmq_url, pool,
                                                                                        tmp_path):
    model, batch = mlp_model(), batch_of(600)
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for index, arrays in enumerate(batch):
        np.savez(inputs / f"job-{index:04d}.npz", **arrays)
    (tmp_path / "model.onnx").write_bytes(model)
    enclaveq("policy", "init", "--sim-dir", str(tee.dir), "--out", str(tmp_path / "policy.toml"))
    # Deadlines 600 s away: a result the second run failed to collect would be waited for until
    # then (the worker drops its copy), far beyond the 120 s the second run is given.
    command = ["submit", "--broker", rabbitmq_url, "--pool", pool, "--policy", str(tmp_path / "policy.toml"),
               "--inputs", str(inputs), "--output", str(output), "--max-in-flight", "64", "--frame-jobs", "8",
               "--timeout", "600"]
    # A worker that takes one frame at a time, so the batch is still running when the producer dies.
    async with running_worker(tee, rabbitmq_url, pool, prefetch=1) as worker:
        async with AsyncClient(rabbitmq_url, pool, tee.policy()) as client:
            model_id = await client.upload_model(model)
        command += ["--model", model_id]
        producer = await asyncio.create_subprocess_exec(sys.executable, "-m", "enclaveq", *command, cwd=ROOT,
                                                        stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.DEVNULL)
        await wait_until(lambda: len(list(output.glob("job-*.npz"))) >= 150, "150 results written", timeout=120)
        producer.send_signal(signal.SIGKILL)
        await producer.wait()
        written_before = {path.name for path in output.glob("job-*.npz")}
        header = json.loads((output / ".enclaveq-journal").read_text().splitlines()[0])
        batch_queue = common.reply_queue(header["reply_queue"])
        # The jobs the killed run sent still run; their results wait in the batch's queue.
        for _ in range(300):
            if await _queue_length(rabbitmq_url, batch_queue) > 0:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("no result reached the batch's reply queue after the producer died")

        again = await asyncio.to_thread(enclaveq, *command, timeout=120)
        resumed = re.search(r"resumed: (\d+) results collected from the batch's reply queue, (\d+) jobs sent "
                            r"again under their first id, (\d+) sent anew", again.stderr)
        assert resumed, again.stderr
        print(f"\nkilled after {len(written_before)} results written; the second run: {resumed.group(0)}")
        collected, resent, anew = map(int, resumed.groups())
        # The results that waited came back from the queue, whether before a copy of their request
        # was sent (collected) or after (sent again, the copy dropped by the worker).
        assert collected + resent > 0
        # Every job ran once, but those whose result the killed run had received and not written.
        assert _ran(worker) == 600 + anew and anew <= 64 + 8
        assert f"jobs: {600 - len(written_before)}  failed: 0" in again.stdout
    for index, arrays in enumerate(batch):
        result = output / f"job-{index:04d}.npz"
        assert _same_as_direct(model, arrays, read_npz(result)), result.name
    assert not (output / ".enclaveq-journal").exists()
    with pytest.raises(aio_pika.exceptions.ChannelClosed):  # the completed batch's queue is deleted
        await _queue_length(rabbitmq_url, batch_queue)



async def test_submit_into_an_output_holding_another_pools_batch_journal_is_a_usage_error(tee, rabbitmq_url, pool,
                                                                                          tmp_path):
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    output.mkdir()
    np.savez(inputs / "job-0.npz", **batch_of(1)[0])
    enclaveq("policy", "init", "--sim-dir", str(tee.dir), "--out", str(tmp_path / "policy.toml"))
    async with running_worker(tee, rabbitmq_url, pool):
        async with AsyncClient(rabbitmq_url, pool, tee.policy()) as client:
            model_id = await client.upload_model(mlp_model())
        # What a run of the same inputs against another pool left behind when it was killed.
        journal = BatchJournal(output / ".enclaveq-journal", batch=hashlib.sha256(b"job-0.npz").hexdigest())
        journal.start(pool="elsewhere", model_id=model_id, reply_queue="batch-elsewhere")
        journal.close()
        result = await asyncio.to_thread(
            enclaveq, "submit", "--broker", rabbitmq_url, "--pool", pool, "--policy", str(tmp_path / "policy.toml"),
            "--model", model_id, "--inputs", str(inputs), "--output", str(output), check=False)
    assert result.returncode == 2, result.stderr
    assert "is the journal of a batch for pool 'elsewhere'" in result.stderr and "Traceback" not in result.stderr
    assert (output / ".enclaveq-journal").exists()  # nothing of it was lost


async def test_reply_queues_a_dead_producer_leaves_behind_expire_and_a_named_clients_do_not(
        tee, rabbitmq_url, rabbitmqctl, pool, tmp_path):
    # A client's own queue is deleted at close(); a SIGKILLed process cannot, so RabbitMQ must.
    path = tmp_path / "batch.journal"
    async with running_worker(tee, rabbitmq_url, pool), AsyncClient(rabbitmq_url, pool, tee.policy()) as client:
        model_id = await client.upload_model(mlp_model())
        await _take(client, model_id, batch_of(20), path, count=5)  # stopped early: its batch queue stays
        batch_queue = common.reply_queue(BatchJournal(path).reply_queue or "")
        own_queue = common.reply_queue(client.name)
        named = AsyncClient(rabbitmq_url, pool, tee.policy(), name=f"{pool}-named")
        async with named:
            # Each argument is listed as [name, AMQP type, value].
            queues = {q["name"]: {name: value for name, _, value in q["arguments"]}
                      for q in await asyncio.to_thread(rabbitmqctl.json, "list_queues", "name", "arguments")}
        await _take(client, model_id, batch_of(20), path)  # completed: its batch queue is deleted
    try:
        assert queues[own_queue].get("x-expires") == 24 * 3600 * 1000
        assert queues[batch_queue].get("x-expires") == 24 * 3600 * 1000
        # A named client's queue outlives it by design (and an existing one keeps its arguments).
        assert "x-expires" not in queues[common.reply_queue(named.name)]
    finally:
        async with open_broker(rabbitmq_url) as broker:
            await broker.delete_reply_queue(named.name)
