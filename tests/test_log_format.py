"""`enclaveq worker --log-format json`: one JSON object per log record and line, that never raises
and never shows more than the text format would (no raw arguments, no unlisted extras, no
broker password)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from enclaveq.cli.log_format import EXTRA_FIELDS, JsonFormatter, log_handler

from .processes import ROOT, WorkerProcess

SECRET = "s3cret-Pa55w0rd"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def record(msg: object = "worker %s serving pool %r", *args: object, level: int = logging.INFO,
           exc_info: object = None, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("enclaveq.worker", level, __file__, 1, msg, args or None, exc_info)  # type: ignore[arg-type]
    made.__dict__.update(extra)
    return made


def formatted(made: logging.LogRecord) -> dict:
    line = JsonFormatter().format(made)
    assert "\n" not in line and line.isascii()
    return json.loads(line)


def raised() -> tuple:
    try:
        raise ConnectionError("the broker went away")
    except ConnectionError:
        return sys.exc_info()


# --------------------------------------------------------------------------- the formatter


def test_a_record_is_one_line_with_time_level_logger_and_the_formatted_message():
    made = record("worker %s serving pool %r", "w1", "demo")
    line = formatted(made)
    assert line == {"ts": line["ts"], "level": "INFO", "logger": "enclaveq.worker",
                    "msg": "worker w1 serving pool 'demo'"}
    assert TIMESTAMP.match(line["ts"])
    when = datetime.strptime(line["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(when.timestamp() - made.created) < 0.001


def test_an_exception_adds_its_type_and_traceback_text():
    line = formatted(record("a housekeeping round failed", level=logging.ERROR, exc_info=raised()))
    assert line["level"] == "ERROR" and line["exc_type"] == "ConnectionError"
    assert line["exc"].startswith("Traceback") and "the broker went away" in line["exc"]
    assert "exc" not in formatted(record("no exception here"))


def test_listed_extras_are_fields_and_anything_else_a_record_carries_is_left_out():
    line = formatted(record("joined", pool="demo", epoch=3, worker_id="w-1", outcome=None,
                            broker_url=f"amqp://u:{SECRET}@host/", body=b"plaintext"))
    assert {k: line[k] for k in ("pool", "epoch", "worker_id", "outcome")} == \
           {"pool": "demo", "epoch": 3, "worker_id": "w-1", "outcome": None}
    assert "broker_url" not in line and "body" not in line and SECRET not in json.dumps(line)
    assert set(line) <= {"ts", "level", "logger", "msg", "exc_type", "exc", "stack", *EXTRA_FIELDS}


def test_extras_that_are_not_json_values_become_strings_and_never_cost_the_line():
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    line = formatted(record("x", epoch=float("nan"), reason=Unprintable(), kind=("job", 1)))
    assert line["epoch"] == "nan" and line["kind"] == "('job', 1)"
    assert line["reason"] == "<unprintable Unprintable: RuntimeError>"


def test_a_message_whose_formatting_fails_says_so_without_its_arguments():
    # Too many arguments, the wrong type, and an object whose str() raises: none may raise.
    line = formatted(record("connected", f"amqp://u:{SECRET}@host/"))
    assert line["msg"] == "unformattable log message (TypeError): connected" and SECRET not in json.dumps(line)
    assert formatted(record("job %d done", SECRET))["msg"].startswith("unformattable log message (TypeError)")

    class Broken:
        def __str__(self) -> str:
            raise ValueError(SECRET)

    line = formatted(record(Broken()))
    assert line["msg"] == "unformattable log message (ValueError): <Broken>" and SECRET not in json.dumps(line)


def test_unicode_and_newlines_stay_on_one_ascii_line_and_read_back_the_same():
    message = "modèle « 日本 » ✓\nsecond line \udc80"
    assert formatted(record(message))["msg"] == message


def test_the_json_handler_writes_exception_records_of_a_real_logger_one_per_line():
    stream = io.StringIO()
    logger = logging.getLogger("enclaveq.test-log-format")
    logger.addHandler(log_handler("json", stream))
    logger.propagate = False
    try:
        logger.warning("first")
        try:
            raise KeyError("k")
        except KeyError:
            logger.exception("second, with %d %s", 2, "args")
    finally:
        logger.handlers.clear()
        logger.propagate = True
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["level"], line["msg"]) for line in lines] == [("WARNING", "first"), ("ERROR", "second, with 2 args")]
    assert lines[1]["exc_type"] == "KeyError" and "KeyError: 'k'" in lines[1]["exc"]


def test_the_text_format_is_unchanged_and_an_unknown_format_is_refused():
    stream = io.StringIO()
    handler = log_handler("text", stream)
    handler.handle(record("worker %s ready", "w1"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO enclaveq.worker: worker w1 ready\n",
                        stream.getvalue())
    with pytest.raises(ValueError, match="xml"):
        log_handler("xml")


# --------------------------------------------------------------------------- the worker process


def json_lines(text: str) -> list[dict]:
    lines = []
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            pytest.fail(f"not a JSON line: {raw!r}")
        assert {"ts", "level", "logger", "msg"} <= set(line) and TIMESTAMP.match(line["ts"]), raw
        lines.append(line)
    return lines


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_json_worker_writes_only_json_lines_and_never_the_broker_password(rabbitmq_url, pool, tee, tmp_path,
                                                                          monkeypatch):
    # A cluster list whose first node is down: the worker logs that node's URL (redacted), at DEBUG,
    # with the AMQP client's own lines too (ENCLAVEQ_DEBUG keeps them).
    monkeypatch.setenv("ENCLAVEQ_DEBUG", "1")
    broker = f"amqp://ops:{SECRET}@127.0.0.1:{closed_port()}/,{rabbitmq_url}"
    worker = WorkerProcess(broker, pool, tee.dir, tmp_path / "worker.log", "--log-format", "json",
                           "--log-level", "DEBUG")
    try:
        worker.wait_ready()
        assert worker.terminate() == 0
    finally:
        worker.close()
    output = worker.log()
    assert SECRET not in output
    lines = json_lines(output)
    messages = [line["msg"] for line in lines]
    assert any(m.startswith("node amqp://***@127.0.0.1:") and "unavailable" in m for m in messages)
    assert any(m.startswith("SIMULATED TEE") and line["level"] == "WARNING" for m, line in zip(messages, lines))
    assert "ready; send SIGTERM or SIGINT to stop" in messages and "stopping: finishing in-flight jobs" in messages


@pytest.mark.parametrize(("sim_dir", "code", "said"), [("nope", 3, "sim init"), ("sim", 1, "cannot connect to amqp://***@")],
                         ids=["refused", "no broker"])
def test_the_error_that_ends_a_json_worker_is_a_record_too_and_the_environment_chooses_json(tee, tmp_path, sim_dir,
                                                                                            code, said):
    env = {**os.environ, "ENCLAVEQ_LOG_FORMAT": "json"}
    result = subprocess.run([sys.executable, "-m", "enclaveq", "worker", "--broker",
                             f"amqp://ops:{SECRET}@127.0.0.1:{closed_port()}/", "--pool", "p",
                             "--sim-dir", str(tmp_path / sim_dir)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == code and result.stdout == "" and SECRET not in result.stderr
    (error,) = [line for line in json_lines(result.stderr) if line["level"] == "ERROR"]
    assert error["logger"] == "enclaveq.worker" and error["msg"].startswith("error: ") and said in error["msg"]
