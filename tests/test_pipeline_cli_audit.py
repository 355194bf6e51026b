"""What an audit of the pipeline command line found, each pinned through the real CLI: a publish
topic outside the source filter is a usage error (exit 2); a wiring error found once the pool's
models are known is one line naming the file (exit 2), while a refusal of the pool's state stays
exit 1; a TOML syntax error names its file once; a --recipient that is neither a key nor an
existing file says the file does not exist; the subscriber's refusal summary reads as a count.
"""

from __future__ import annotations

from collections import Counter

import pytest

from enclaveq.cli.pipeline import _invalid_definition
from producer_sdk.errors import PIPELINE_INVALID, JobTimeout, PipelineRejected, job_error

from . import test_pipeline_cli
from .test_pipeline_cli import assert_usage_error, enclaveq, offline, pipeline_for_one_recipient, run
from .test_pipeline_sdk import write_pipeline

deployment = test_pipeline_cli.deployment  # the fixture: a simulated worker on the in-memory broker


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


async def test_publish_on_a_topic_outside_the_source_filter_is_a_usage_error(deployment, tmp_path, unique_name):
    _, pipeline_id = await pipeline_for_one_recipient(deployment, tmp_path, unique_name)
    result = await enclaveq("publish", *deployment, "--pipeline", pipeline_id, "--text", "hello",
                            "--topic", f"elsewhere-{unique_name}/device-1/readings")
    assert_usage_error(result, "does not match the pipeline's source filter")
    assert len(error_lines(result.stderr)) == 1, result.stderr


async def test_a_wiring_error_found_against_the_pools_models_is_one_line_naming_the_file(
        deployment, tmp_path, unique_name):
    # The TOML parses (checked before connecting); only the pool's real models show that stage
    # mlp has no output "nolabel".
    toml = write_pipeline(tmp_path / "chain", name="chain", topics=unique_name, recipients=[b"\x09" * 32],
                          stage2_input="mlp.nolabel")
    result = await enclaveq("pipeline", "create", str(toml), *deployment)
    assert_usage_error(result)
    assert error_lines(result.stderr) == [
        f"error: {toml}: stage[1].inputs.logits: stage mlp has no output nolabel"], result.stderr
    assert "" not in result.stderr.rstrip("\n").splitlines(), repr(result.stderr)  # no empty line after it


async def test_a_refusal_of_the_pools_state_stays_exit_1(deployment, tmp_path, unique_name):
    # Replacing a pipeline with another source topic is refused by what the pool holds, not by
    # the file alone: a refusal (exit 1), not a usage error.
    toml = write_pipeline(tmp_path / "chain", name="chain", topics=unique_name, recipients=[b"\x09" * 32])
    assert (await enclaveq("pipeline", "create", str(toml), *deployment)).exit_code == 0
    toml.write_text(toml.read_text().replace(f'topic = "{unique_name}/+/readings"',
                                             f'topic = "{unique_name}/+/other"'))
    result = await enclaveq("pipeline", "create", str(toml), *deployment)
    assert result.exit_code == 1 and result.stdout == "" and "Traceback" not in result.output, result.output
    assert len(error_lines(result.stderr)) == 1 and "topic" in result.stderr, result.stderr


def test_a_toml_syntax_error_names_the_file_once(tmp_path):
    toml = tmp_path / "bad" / "pipeline.toml"
    toml.parent.mkdir()
    toml.write_text('[pipeline]\nname = "chain"\ndescription = @oops\n')
    result = run("pipeline", "create", str(toml), *offline(tmp_path))
    assert_usage_error(result, "is not valid TOML")
    assert result.stderr.count(str(toml)) == 1, result.stderr
    assert error_lines(result.stderr)[0].startswith(f"error: {toml} is not valid TOML"), result.stderr


def test_a_recipient_that_is_neither_a_key_nor_an_existing_file_says_the_file_does_not_exist(tmp_path):
    for value in ("nokey.key", str(tmp_path / "keys" / "dashboard.pem"), "dashboard"):
        result = run("pipeline", "init", "--example", "document", "--recipient", value, "--out", str(tmp_path / "out"))
        assert_usage_error(result, "--recipient", f"no such file: {value}", "64 hex characters")
    assert not (tmp_path / "out").exists()


class _RefusingSubscriber:
    """A subscriber that refused five deliveries from another pool and then heard nothing."""

    def __init__(self, *args, **kwargs) -> None:
        self.refusals = Counter(wrong_pool=5, forged=1)

    def __enter__(self) -> _RefusingSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def receive(self, timeout: float | None = None):
        raise JobTimeout("nothing")


@pytest.mark.parametrize("count", [None, "1"])
def test_the_subscribers_refusal_summary_reads_as_a_count(tmp_path, monkeypatch, count):
    monkeypatch.setattr("enclaveq.cli.pipeline.ResultSubscriber", _RefusingSubscriber)
    key = tmp_path / "dashboard.key"
    assert run("keys", "generate", "--kind", "recipient", "--out", str(key)).exit_code == 0
    result = run("subscribe", *offline(tmp_path), "--pipeline", "ab" * 32, "--key", str(key),
                 "--output", str(tmp_path / "results"), *(["--count", count] if count else []))
    if count is None:
        assert result.exit_code == 0, result.output
        assert result.stderr.splitlines()[-1] == "refused 6 results: forged 1, wrong_pool 5", result.stderr
    else:
        assert result.exit_code == 1, result.output
        assert error_lines(result.stderr)[-1].endswith("; refused 6 results: forged 1, wrong_pool 5"), result.stderr


def test_pipeline_init_help_shows_the_text_alert_defaults_the_example_uses():
    # Written out in the help (pipeline_examples needs the `pipelines` extra); kept equal to it here.
    examples = pytest.importorskip("enclaveq.pipeline_examples")
    help_text = " ".join(run("pipeline", "init", "--help").stdout.split())
    assert f'Default: "{examples.ALERT_REFERENCE}"' in help_text, help_text
    assert f"Default: {examples.ALERT_THRESHOLD:g}." in help_text, help_text


@pytest.mark.parametrize(("refusal", "usage"), [
    # The SDK's type check against the pool's models, naming the key at fault: the file's error.
    (PipelineRejected("stage[1].inputs.logits: stage mlp has no output nolabel", key="stage[1].inputs.logits"), True),
    # The same check made by a worker (a stage model this session may not list).
    (job_error(PIPELINE_INVALID, "the pipeline does not type-check: stage[1].inputs.logits: stage mlp has no "
                                 "output nolabel", "job-1"), True),
    # Refusals of what the pool holds: a replacement that changes a topic, a stale definition.
    (PipelineRejected("source.topic: pipeline x already exists with another source topic; delete it first",
                      key="source.topic"), False),
    (job_error(PIPELINE_INVALID, "pipeline x: a replacement may not change its source or sink topic", "job-1"), False),
    (PipelineRejected("stale_order: a definition at least as new is in force", code="stale_order", job_id="job-1"),
     False),
])
def test_only_a_definition_the_pool_cannot_run_is_a_usage_error(refusal, usage):
    assert isinstance(refusal, PipelineRejected)
    assert _invalid_definition(refusal) is usage
