"""The pipeline command line (issue 11): `keys generate --kind recipient`, `keys show`, `pipeline
init|create|list|delete`, `publish` and `subscribe`, as the issue's contract names them.

Every bad input is one line on stderr and the right exit code (2 for usage) without a traceback,
before anything is sent; the documented flow runs end to end against a worker on the in-memory
broker, and what the recipient's files hold equals running the chain directly.
"""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from attestation.policy import write_policy
from broker_adapters.memory import MemoryBroker
from enclaveq.cli import cli
from enclaveq.cli.pipeline import EXAMPLES, _save
from producer_sdk.results import load_recipient_key, recipient_public_key
from protocol.ownership import load_signing_key, public_key_bytes
from protocol.results import PipelineResult

from .support import batch_of, running_worker
from .test_pipeline_sdk import refuse_events_after, run_chain, write_pipeline

NEW_COMMANDS = [["pipeline"], ["pipeline", "init"], ["pipeline", "create"], ["pipeline", "list"],
                ["pipeline", "delete"], ["publish"], ["subscribe"]]


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


async def enclaveq(*args: str) -> Result:
    """The command in this process (the memory broker lives here), off the worker's event loop."""
    return await asyncio.to_thread(run, *args)


def assert_usage_error(result: Result, *words: str) -> None:
    """Exit 2, nothing on stdout, one short explanation on stderr, no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == "" and "Traceback" not in result.output
    for word in words:
        assert word in result.stderr, result.stderr


def offline(tmp_path: Path) -> list[str]:
    """Connection options for commands that must fail before connecting."""
    policy = tmp_path / "policy.toml"
    policy.write_text("")
    return ["--broker", "memory://nobody-listens", "--pool", "none", "--policy", str(policy), "--timeout", "1"]


# --------------------------------------------------------------------------- help and keys


@pytest.mark.parametrize("command", NEW_COMMANDS, ids=" ".join)
def test_every_pipeline_command_has_a_help_with_examples(command):
    result = run(*command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.stdout and "Example" in result.stdout


def test_the_examples_offered_are_the_ones_pipeline_examples_writes():
    examples = pytest.importorskip("enclaveq.pipeline_examples")
    assert EXAMPLES == examples.EXAMPLES


def test_keys_generate_recipient_writes_an_x25519_key_and_prints_its_public_key(tmp_path):
    out = tmp_path / "dashboard.key"
    result = run("keys", "generate", "--kind", "recipient", "--out", str(out))
    assert result.exit_code == 0, result.output
    (printed,) = result.stdout.splitlines()
    assert bytes.fromhex(printed) == recipient_public_key(load_recipient_key(out))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and "subscribe --key" in result.stderr

    shown = run("keys", "show", str(out))
    assert shown.exit_code == 0 and shown.stdout.strip() == printed  # scripts: $(enclaveq keys show FILE)
    assert "recipient (X25519)" in shown.stderr

    again = run("keys", "generate", "--kind", "recipient", "--out", str(out))
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_keys_generate_still_makes_an_owner_key_by_default_and_show_names_its_kind(tmp_path):
    out = tmp_path / "owner.pem"
    result = run("keys", "generate", "--out", str(out))
    assert result.exit_code == 0
    assert bytes.fromhex(result.stdout.strip()) == public_key_bytes(load_signing_key(out))
    shown = run("keys", "show", str(out))
    assert shown.stdout.strip() == result.stdout.strip() and "owner or producer (Ed25519)" in shown.stderr


def test_keys_show_of_neither_kind_of_key_is_one_line_without_the_files_contents(tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("SECRET-MATERIAL-1234")
    result = run("keys", "show", str(garbage))
    assert result.exit_code == 2 and "not a PEM Ed25519 (signing) or X25519 (recipient) key" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "SECRET" not in result.output
    assert_usage_error(run("keys", "generate", "--kind", "sideways", "--out", str(tmp_path / "k")), "--kind")


# --------------------------------------------------------------------------- refusals before connecting


def test_publish_takes_exactly_one_kind_of_event(tmp_path):
    pipeline = ["--pipeline", "ab" * 32]
    assert_usage_error(run("publish", *offline(tmp_path), *pipeline), "exactly one of")
    x = tmp_path / "x.npy"
    np.save(x, np.zeros(3))
    assert_usage_error(run("publish", *offline(tmp_path), *pipeline, "--text", "hi", "--input", f"x={x}"),
                       "exactly one of", "--input, --text")
    assert_usage_error(run("publish", *offline(tmp_path), *pipeline, "--input", "no-equals-sign"), "NAME=FILE.npy")
    assert_usage_error(run("publish", *offline(tmp_path), *pipeline, "--input", f"x={tmp_path / 'nope.npy'}"),
                       "not a readable .npy")
    empty = tmp_path / "events"
    empty.mkdir()
    assert_usage_error(run("publish", *offline(tmp_path), *pipeline, "--inputs", str(empty)), "no .npz files")
    assert_usage_error(run("publish", *offline(tmp_path), "--pipeline", "my-pipeline", "--text", "hi"),
                       "64 lowercase hex")


def test_subscribe_refuses_a_key_that_is_not_a_recipient_key_and_a_count_below_one(tmp_path):
    signing = tmp_path / "owner.pem"
    assert run("keys", "generate", "--out", str(signing)).exit_code == 0
    common = [*offline(tmp_path), "--pipeline", "ab" * 32, "--output", str(tmp_path / "out")]
    result = run("subscribe", *common, "--key", str(signing))
    assert_usage_error(result, "not a PEM X25519")
    assert len(result.stderr.strip().splitlines()) == 1
    recipient = tmp_path / "r.key"
    assert run("keys", "generate", "--kind", "recipient", "--out", str(recipient)).exit_code == 0
    assert_usage_error(run("subscribe", *common, "--key", str(recipient), "--count", "0"), "--count")


def test_pipeline_create_names_the_toml_key_at_fault_before_connecting(tmp_path):
    path = write_pipeline(tmp_path / "p", name="chain", topics="unit", recipients=[b"\x09" * 32])
    path.write_text(path.read_text().replace('model = "softmax.onnx"', 'model = "missing.onnx"'))
    result = run("pipeline", "create", str(path), *offline(tmp_path))
    assert_usage_error(result, "stage[1].model", "missing.onnx")
    assert len(result.stderr.strip().splitlines()) == 1


def test_pipeline_delete_and_init_refuse_bad_arguments(tmp_path):
    assert_usage_error(run("pipeline", "delete", "not-an-id", *offline(tmp_path)), "64 lowercase hex")
    init = ["pipeline", "init", "--out", str(tmp_path / "out")]
    assert_usage_error(run(*init, "--example", "poetry", "--recipient", "ab" * 32), "--example")
    assert_usage_error(run(*init, "--example", "document", "--recipient", "ab" * 32, "--about", "outages"),
                       "text-alert only")
    assert_usage_error(run(*init, "--example", "document", "--recipient", "somebody"), "--recipient")
    assert_usage_error(run(*init, "--example", "document", "--recipient", "00" * 32), "small-order")
    assert not (tmp_path / "out").exists()


def test_pipeline_init_writes_the_document_example_for_its_recipients_and_keeps_an_existing_one(tmp_path):
    pytest.importorskip("magika")
    key = tmp_path / "dashboard.key"
    public = run("keys", "generate", "--kind", "recipient", "--out", str(key)).stdout.strip()
    out = tmp_path / "documents"
    result = run("pipeline", "init", "--example", "document", "--recipient", str(key), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == str(out / "pipeline.toml")
    text = (out / "pipeline.toml").read_text()
    assert public in text and all((out / name).is_file() for name in ("magika.onnx", "magika_features.onnx"))
    again = run("pipeline", "init", "--example", "document", "--recipient", public, "--out", str(out))
    assert again.exit_code == 2 and "--force" in again.stderr
    assert (out / "pipeline.toml").read_text() == text


# --------------------------------------------------------------------------- end to end


@pytest.fixture
async def deployment(tmp_path, tee, memory_url, pool):
    """A simulated worker serving the test's pool on the in-memory broker, and a policy file for it."""
    policy = write_policy(tmp_path / "policy.toml", tee.policy())
    async with running_worker(tee, memory_url, pool):
        yield ["--broker", memory_url, "--pool", pool, "--policy", str(policy)]


async def pipeline_for_one_recipient(deployment: list[str], tmp_path: Path, topics: str) -> tuple[Path, str]:
    """A recipient key (``tmp_path/dashboard.key``) and the id of a pipeline created for it alone."""
    key = tmp_path / "dashboard.key"
    public = (await enclaveq("keys", "generate", "--kind", "recipient", "--out", str(key))).stdout.strip()
    toml = write_pipeline(tmp_path / "chain", name="chain", topics=topics, recipients=[bytes.fromhex(public)])
    return key, (await enclaveq("pipeline", "create", str(toml), *deployment)).stdout.splitlines()[-1]


async def test_create_publish_subscribe_list_and_delete_as_the_contract_says(deployment, tmp_path, unique_name):
    key = tmp_path / "dashboard.key"
    public = (await enclaveq("keys", "generate", "--kind", "recipient", "--out", str(key))).stdout.strip()
    toml = write_pipeline(tmp_path / "chain", name="chain", topics=unique_name, recipients=[bytes.fromhex(public)])

    created = await enclaveq("pipeline", "create", str(toml), *deployment)
    assert created.exit_code == 0, created.output
    pipeline_id = created.stdout.splitlines()[-1]
    assert len(pipeline_id) == 64 and "1 recipient" in created.stderr
    listed = await enclaveq("pipeline", "list", *deployment)
    assert listed.exit_code == 0 and listed.stdout.startswith(f"{pipeline_id}  chain  {unique_name}/+/readings")

    events_dir = tmp_path / "events"
    events_dir.mkdir()
    events = batch_of(5)
    for i, event in enumerate(events):
        np.savez(events_dir / f"event-{i}.npz", **event)
    topic = ["--topic", f"{unique_name}/device-3/readings"]
    published = await enclaveq("publish", *deployment, "--pipeline", pipeline_id, "--inputs", str(events_dir), *topic)
    assert published.exit_code == 0, published.output
    event_ids = published.stdout.splitlines()
    assert len(event_ids) == 5 and len(set(event_ids)) == 5  # one line per event, in file order

    results = tmp_path / "results"
    received = await enclaveq("subscribe", *deployment, "--pipeline", pipeline_id, "--key", str(key),
                              "--output", str(results), "--count", "5", "--timeout", "30")
    assert received.exit_code == 0, received.output
    lines = received.stdout.splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(event_ids)
    assert all(f"pipeline={pipeline_id}" in line and " models=" in line and " publisher=" in line for line in lines)
    for event_id, event in zip(event_ids, events):
        with np.load(results / f"{event_id}.npz") as got:
            expected = run_chain(event)
            np.testing.assert_array_equal(got["label"], expected["label"])
            np.testing.assert_allclose(got["probabilities"], expected["probabilities"], rtol=1e-6)

    # One event of named .npy inputs; the result waits in the inbox until a subscriber comes.
    x, bias = tmp_path / "x.npy", tmp_path / "bias.npy"
    np.save(x, events[0]["x"])
    np.save(bias, events[0]["bias"])
    one = await enclaveq("publish", *deployment, "--pipeline", pipeline_id, "--input", f"x={x}",
                         "--input", f"bias={bias}", *topic)
    assert one.exit_code == 0 and len(one.stdout.splitlines()) == 1
    later = await enclaveq("subscribe", *deployment, "--pipeline", pipeline_id, "--key", str(key),
                           "--output", str(results), "--count", "1", "--timeout", "30")
    assert later.exit_code == 0 and later.stdout.split()[0] == one.stdout.strip()

    # Nothing more is coming: a clear error and exit 1 when --count is not reached in time.
    nothing = await enclaveq("subscribe", *deployment, "--pipeline", pipeline_id, "--key", str(key),
                             "--output", str(results), "--count", "1", "--timeout", "0.5")
    assert nothing.exit_code == 1 and "only 0 of 1 results" in nothing.stderr and "Traceback" not in nothing.output

    deleted = await enclaveq("pipeline", "delete", pipeline_id, *deployment)
    assert deleted.exit_code == 0 and deleted.stdout.strip() == f"deleted {pipeline_id}"
    gone = await enclaveq("publish", *deployment, "--pipeline", pipeline_id, "--input", f"x={x}",
                          "--input", f"bias={bias}", *topic)
    assert gone.exit_code == 1 and "has no pipeline" in gone.stderr


async def test_a_key_that_is_not_a_recipient_is_told_so_by_subscribe(deployment, tmp_path, unique_name):
    key, stranger = tmp_path / "dashboard.key", tmp_path / "stranger.key"
    public = (await enclaveq("keys", "generate", "--kind", "recipient", "--out", str(key))).stdout.strip()
    assert (await enclaveq("keys", "generate", "--kind", "recipient", "--out", str(stranger))).exit_code == 0
    toml = write_pipeline(tmp_path / "chain", name="chain", topics=unique_name, recipients=[bytes.fromhex(public)])
    pipeline_id = (await enclaveq("pipeline", "create", str(toml), *deployment)).stdout.splitlines()[-1]
    refused = await enclaveq("subscribe", *deployment, "--pipeline", pipeline_id, "--key", str(stranger),
                             "--output", str(tmp_path / "results"), "--count", "1", "--timeout", "5")
    assert refused.exit_code == 1 and "not among its recipients" in refused.stderr
    assert refused.stdout == ""


async def test_publish_names_an_inputs_file_that_is_not_an_npz_as_submit_does(deployment, tmp_path, unique_name):
    key, pipeline_id = await pipeline_for_one_recipient(deployment, tmp_path, unique_name)
    text, npy = tmp_path / "text", tmp_path / "npy"
    text.mkdir()
    npy.mkdir()
    (text / "event.npz").write_text("not numpy at all")
    with open(npy / "event.npz", "wb") as handle:  # an .npy file under an .npz name
        np.save(handle, np.zeros(3, np.float32))
    for folder in (text, npy):
        result = await enclaveq("publish", *deployment, "--pipeline", pipeline_id, "--inputs", str(folder),
                                "--topic", f"{unique_name}/device-1/readings")
        assert_usage_error(result, f"{folder / 'event.npz'}: not a readable .npz file")
        assert "pickled" not in result.stderr
        assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


async def test_publish_on_a_topic_no_broker_takes_is_one_line_not_a_traceback(deployment, tmp_path, unique_name):
    key, pipeline_id = await pipeline_for_one_recipient(deployment, tmp_path, unique_name)
    result = await enclaveq("publish", *deployment, "--pipeline", pipeline_id, "--text", "hello",
                            "--topic", f"{unique_name}/room 1/readings")
    assert result.exit_code in (1, 2) and result.stdout == "", result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, ValueError)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "topic levels are 1-128 characters" in errors[0], result.stderr


async def assert_nothing_reached_the_recipient(deployment, pipeline_id: str, key: Path, tmp_path: Path) -> None:
    """The recipient's inbox is empty: a subscriber waiting 3 s for one result gets none."""
    nothing = await enclaveq("subscribe", *deployment, "--pipeline", pipeline_id, "--key", str(key),
                             "--output", str(tmp_path / "results"), "--count", "1", "--timeout", "3")
    assert nothing.exit_code == 1 and "only 0 of 1 results" in nothing.stderr, nothing.output


async def test_publish_checks_every_inputs_file_before_publishing_any(deployment, tmp_path, unique_name):
    # A bad file after a good one used to publish the good one (once the window let it be confirmed
    # before the bad file was read: --max-in-flight 1) and exit 2 without printing its id.
    key, pipeline_id = await pipeline_for_one_recipient(deployment, tmp_path, unique_name)
    events = tmp_path / "events"
    events.mkdir()
    for good, event in zip(("a-good.npz", "b-good.npz", "e-good.npz"), batch_of(3)):
        np.savez(events / good, **event)
    (events / "c-bad.npz").write_text("not numpy at all")
    (events / "d-bad.npz").write_bytes(b"")
    result = await enclaveq("publish", *deployment, "--pipeline", pipeline_id, "--inputs", str(events),
                            "--topic", f"{unique_name}/device-1/readings", "--max-in-flight", "1")
    assert_usage_error(result, f"{events / 'c-bad.npz'}: not a readable .npz file",
                       f"{events / 'd-bad.npz'}: not a readable .npz file", "nothing was published")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    await assert_nothing_reached_the_recipient(deployment, pipeline_id, key, tmp_path)


async def test_publish_refuses_a_batch_with_an_event_the_pipeline_cannot_take_before_publishing_any(
        deployment, tmp_path, unique_name):
    # One event of float64 where the pipeline takes float32: it used to be published (exit 0) and
    # fail at the pool, where nobody heard of it; the good events around it went.
    key, pipeline_id = await pipeline_for_one_recipient(deployment, tmp_path, unique_name)
    events = tmp_path / "events"
    events.mkdir()
    good = batch_of(3)
    np.savez(events / "a-good.npz", **good[0])
    np.savez(events / "b-float64.npz", **{**good[1], "x": good[1]["x"].astype(np.float64)})
    np.savez(events / "c-good.npz", **good[2])
    result = await enclaveq("publish", *deployment, "--pipeline", pipeline_id, "--inputs", str(events),
                            "--topic", f"{unique_name}/device-1/readings")
    assert_usage_error(result, f"{events / 'b-float64.npz'}: event: input 'x' must be float32, got float64",
                       "nothing was published (1 of 3 events do not fit the pipeline)")
    await assert_nothing_reached_the_recipient(deployment, pipeline_id, key, tmp_path)


async def test_publish_of_one_event_with_an_input_the_pipeline_does_not_take_is_a_usage_error(
        deployment, tmp_path, unique_name):
    _, pipeline_id = await pipeline_for_one_recipient(deployment, tmp_path, unique_name)
    data = tmp_path / "data.npy"
    np.save(data, np.zeros((1, 4), np.float32))
    result = await enclaveq("publish", *deployment, "--pipeline", pipeline_id, "--input", f"data={data}",
                            "--topic", f"{unique_name}/device-1/readings")
    assert_usage_error(result, "missing ['bias', 'x'], unexpected ['data']", "nothing was published")


async def test_publish_that_fails_partway_names_each_file_it_published_and_how_many_of_all(
        deployment, tmp_path, unique_name, monkeypatch):
    key, pipeline_id = await pipeline_for_one_recipient(deployment, tmp_path, unique_name)
    events_dir = tmp_path / "events"
    events_dir.mkdir()
    events = batch_of(10)
    for i, event in enumerate(events):
        np.savez(events_dir / f"event-{i}.npz", **event)
    # The broker takes the first three events (four in flight) and refuses every one after.
    confirmed = refuse_events_after(3, MemoryBroker, monkeypatch)
    result = await enclaveq("publish", *deployment, "--pipeline", pipeline_id, "--inputs", str(events_dir),
                            "--topic", f"{unique_name}/device-1/readings", "--max-in-flight", "4")
    assert result.exit_code == 1 and result.stdout == "" and "Traceback" not in result.output, result.output
    assert len(confirmed) == 3
    told = [line for line in result.stderr.splitlines() if line.startswith(("published:", "error:"))]
    *listed, error = told
    assert error.startswith("error: could not publish event") and "refused the event" in error
    assert error.endswith("; 3 of 10 events were published before it (listed above); publish the others again")
    assert [line.split()[1] for line in listed] == ["event-0.npz", "event-1.npz", "event-2.npz"]  # in file order
    event_ids = [line.split()[2] for line in listed]
    assert len(set(event_ids)) == 3
    # What was listed is what was published: the recipient gets those three, each of its file.
    results = tmp_path / "results"
    received = await enclaveq("subscribe", *deployment, "--pipeline", pipeline_id, "--key", str(key),
                              "--output", str(results), "--count", "3", "--timeout", "30")
    assert received.exit_code == 0, received.output
    assert sorted(line.split()[0] for line in received.stdout.splitlines()) == sorted(event_ids)
    for event_id, event in zip(event_ids, events):
        with np.load(results / f"{event_id}.npz") as got:
            np.testing.assert_array_equal(got["label"], run_chain(event)["label"])


def test_subscribe_writes_every_output_name_0600_and_never_through_a_link(tmp_path):
    outputs = {"file": np.arange(3, dtype=np.float32), "allow_pickle": np.array([1, 2], np.int64),
               "label": np.array(["cat", "dog"], dtype=object)}
    result = PipelineResult(pipeline_id="ab" * 32, event_id="event-1", stage_models=("cd" * 32,),
                            publisher=b"\x01" * 16, pool="pool", epoch=1, produced_ms=0, outputs=outputs)
    elsewhere = tmp_path / "elsewhere.npz"
    elsewhere.write_bytes(b"someone else's file")
    out = tmp_path / "results"
    out.mkdir()
    (out / "event-1.npz").symlink_to(elsewhere)  # planted where the result goes
    _save(out, result)
    path = out / "event-1.npz"
    assert not path.is_symlink() and elsewhere.read_bytes() == b"someone else's file"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with np.load(path, allow_pickle=False) as saved:
        assert sorted(saved.files) == ["allow_pickle", "file", "label"]
        np.testing.assert_array_equal(saved["file"], outputs["file"])
        np.testing.assert_array_equal(saved["allow_pickle"], outputs["allow_pickle"])
        assert saved["label"].tolist() == ["cat", "dog"]
    assert sorted(p.name for p in out.iterdir()) == ["event-1.npz"]  # nothing partial left behind
