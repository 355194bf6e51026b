"""Producer commands: `enclaveq attest`, `model upload|list|delete`, `run`, `submit`, `pool rotate|status`.

Every command attests the pool before it sends anything; every failure is one clear line on
stderr and a non-zero exit (1: refused or failed, 2: usage). Progress goes to stderr so that
stdout stays machine-readable (the model id alone on the last line, JSON with --json). The
commands drive :class:`producer_sdk.Client`; which owner key signs uploads and deletes is
decided in :mod:`enclaveq.cli.owner_key`. The shared connection options
(:func:`connection_options`) and the handling of attestation refusals (:func:`attested`) are
used by the pipeline commands too (:mod:`enclaveq.cli.pipeline`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeVar, cast

import click
import numpy as np

from attestation.errors import AttestationError, PolicyError
from broker_adapters import redact_url
from producer_sdk import AsyncClient, Client, FrameSettings, JobResult
from producer_sdk.async_client import MAX_STATUS_WAIT_SECONDS
from producer_sdk.epochs import forget_pool
from producer_sdk.errors import AttestationFailed, BatchJournalError, EnclaveqError, EpochRollback
from producer_sdk.journal import BatchJournal
from protocol.bodies import MemberStatus
from protocol.errors import KeyFileError, ProtocolError, TensorError
from protocol.frames import MAX_FRAME_JOBS
from protocol.tensors import dtype_name
from protocol.ownership import parse_public_key

from ..durations import DURATION
from .collateral import collateral_of_command, describe_collateral_use, with_collateral_option
from .exits import Interrupted, show_traceback_if_debug
from .params import BROKER_URL
from .npz_files import TEMP_PREFIX, ReadAhead, ResultWriter, write_npz
from .owner_key import (
    DEFAULT_HOME, DEFAULT_KEY_NAME, ENV_HOME, ENV_OWNER_KEY, OwnerKeyError, OwnerKeySource, find_owner_key, load_owner_key,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from rich.progress import Progress

    from attestation.claims import Claims
    from protocol.handshake import Statement

F = TypeVar("F", bound=Callable[..., Any])


def connection_options(*, timeout: float | None = 120.0, timeout_help: str = "Seconds to wait for each result.",
                       producer_key_help: str = "This producer's key file (`enclaveq keys generate`): proves who "
                                                "sends the jobs, which models restricted to some producers require.",
                       collateral: bool = True,
                       ) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The options every command that talks to a pool shares (--broker, --pool, --policy,
    --timeout, --producer-key and --collateral: every one of them attests the pool); commands whose --timeout
    means something else say so. Without --collateral (or without the option) a command uses the
    default collateral cache if it exists (:func:`enclaveq.cli.collateral.collateral_of_command`)."""
    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        if collateral:
            fn = with_collateral_option(fn)

        @click.option("--broker", "broker_url", required=True, type=BROKER_URL,
                      help="Broker URL, e.g. amqp://guest:guest@127.0.0.1:5672/, mqtt://127.0.0.1:1883/ or "
                           "memory://NAME. A RabbitMQ cluster: its nodes' URLs separated by commas "
                           "(amqp://u:p@node1:5672/,amqp://u:p@node2:5672/); the client fails over between them.")
        @click.option("--pool", required=True, metavar="NAME", help="Worker pool to use.")
        @click.option("--policy", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                      help="Attestation policy (TOML) the pool's evidence must satisfy.")
        @click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=timeout,
                      show_default=timeout is not None, help=timeout_help)
        @click.option("--producer-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                      help=producer_key_help)
        @functools.wraps(fn)
        def wrapper(*args: Any, producer_key: Path | None = None, **kwargs: Any) -> None:
            click.get_current_context().meta["enclaveq.producer_key"] = producer_key
            fn(*args, **kwargs)
        return wrapper
    return decorate


_connection_options = connection_options()


def producer_key_option() -> Path | None:
    """The --producer-key of the running command (set by the shared connection options)."""
    key: Path | None = click.get_current_context().meta.get("enclaveq.producer_key")
    return key


_KEY_DEFAULT_HELP = (f"Without it: ${ENV_OWNER_KEY} (a key file) if set, else ${ENV_HOME}/{DEFAULT_KEY_NAME} "
                     f"({ENV_HOME} defaults to {DEFAULT_HOME}).")


def _key_option(help: str) -> Callable[[F], F]:
    return click.option("--owner-key", "owner_key", default=None, metavar="FILE",
                        type=click.Path(exists=True, dir_okay=False, path_type=Path), help=f"{help} {_KEY_DEFAULT_HELP}")


def _owner_key(source: OwnerKeySource, *, create: bool = False,
               owns: Literal["model", "pipeline"] = "model") -> Ed25519PrivateKey:
    """Load (or, for upload, create) the owner key; a missing or unusable key is a usage error (exit 2).
    ``owns``: what the key signs here, a model or a pipeline (named in what is said about the key)."""
    try:
        key, created = load_owner_key(source, create=create, owns=owns)
    except OwnerKeyError as exc:
        _fail(str(exc), 2)
    if created:
        owned = "this pipeline and its models" if owns == "pipeline" else "this model"
        click.echo(f"Created owner key {source.path} (mode 0600): keep it, it is needed to delete or replace "
                   f"{owned} later.", err=True)
    return key


def _client(broker_url: str, pool: str, policy: Path, timeout: float) -> Client:
    return attested(broker_url, pool, lambda: Client(broker_url, pool, policy, timeout=timeout,
                                                     producer_key=producer_key_option(),
                                                     collateral=collateral_of_command()))


T = TypeVar("T")


def attested(broker_url: str, pool: str, connect: Callable[[], T]) -> T:
    """``connect()`` (a client, publisher or subscriber that attests the pool as it connects);
    every refusal is one line (and the policy's violations) on stderr and exit 1. A policy or
    producer key file that cannot be used is the user's input error: exit 2, as in `attest`."""
    try:
        return connect()
    except (EnclaveqError, AttestationError, ProtocolError) as exc:
        _refused(broker_url, pool, exc)


def _refused(broker_url: str, pool: str, exc: EnclaveqError | AttestationError | ProtocolError) -> NoReturn:
    """What :func:`attested` says when connecting failed: one line (and the policy's violations), exit 1.

    A policy file or --producer-key file that cannot be used (PolicyError, KeyFileError: both
    AttestationError/ProtocolError subclasses) goes on to :mod:`enclaveq.cli.exits`, which says it
    in the one line `attest` prints and exits 2 (usage or input error), in every command alike."""
    if isinstance(exc, (PolicyError, KeyFileError)):
        raise exc
    if isinstance(exc, AttestationFailed):
        _fail(f"attestation refused for pool {pool!r} at {redact_url(broker_url)}:\n{exc}{_rollback_hint(exc)}")
    _fail(str(exc))


def _rollback_hint(exc: AttestationFailed) -> str:
    if not isinstance(exc, EpochRollback) or exc.state_file is None:
        return ""
    return "\nFrom the command line: `enclaveq attest --forget-epoch` with the same --broker, --pool and --policy."


def _attested(client: Client) -> tuple[Claims, Statement]:
    """The verified claims and statement of a client that attested its pool (set by then)."""
    claims, statement = client.claims, client.statement
    if claims is None or statement is None:
        _fail("the pool's attestation was not recorded")
    return claims, statement


def _fail(message: str, code: int = 1) -> NoReturn:
    """``error: MESSAGE`` on stderr and exit ``code``; under --debug, called from an ``except``
    block, the traceback of the exception being handled first."""
    show_traceback_if_debug()
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _progress() -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.console import Console
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=False)


@click.command("attest")
@connection_options(timeout_help="Seconds to wait for the pool's evidence.")
@click.option("--json", "as_json", is_flag=True, help="Print the verified claims as one JSON object.")
@click.option("--forget-epoch", is_flag=True,
              help="First forget the newest epoch of --pool this machine remembers (in $ENCLAVEQ_HOME/epochs.json). "
                   "Only for a pool deliberately deleted and created again under the same name: otherwise an "
                   "older epoch means a worker missed a rotation or its sealed state was rolled back.")
def attest_command(broker_url: str, pool: str, policy: Path, timeout: float, as_json: bool,
                   forget_epoch: bool) -> None:
    """Challenge a pool with a fresh nonce and verify its evidence against POLICY.

    Exit 0 with the verified claims; exit 1 with every violated policy field, its value and
    the expectation. The newest epoch seen for each pool is remembered: an older one is refused.
    --timeout bounds the wait for the pool's evidence (default 120 s).

    \b
    Examples:
      enclaveq attest --broker amqp://guest:guest@127.0.0.1:5672/ --pool demo --policy policy.toml
      enclaveq attest --broker mqtt://127.0.0.1:1883/ --pool demo --policy policy.toml --json --timeout 10
      enclaveq attest --broker amqp://guest:guest@10.0.0.5:5672/ --pool demo --policy policy.toml \\
          --collateral ./collateral
    """
    if forget_epoch:
        try:
            if forget_pool(pool):
                click.echo(f"forgot the remembered epoch of pool {pool!r}", err=True)
        except OSError as exc:
            _fail(f"cannot forget the remembered epoch of pool {pool!r}: {exc}")
    try:
        client = Client(broker_url, pool, policy, timeout=timeout, attest_timeout=timeout,
                        producer_key=producer_key_option(), collateral=collateral_of_command())
    except AttestationFailed as exc:
        if as_json:
            show_traceback_if_debug()  # on stderr: stdout keeps the one JSON object
            click.echo(json.dumps({"verified": False, "pool": pool, "error": str(exc),
                                   "violations": [{"field": v.field, "value": v.value, "expected": v.expected}
                                                  for v in exc.violations]}, indent=2))
            sys.exit(1)
        _fail(str(exc) + _rollback_hint(exc))
    except EnclaveqError as exc:
        _fail(str(exc))
    with client:
        claims, st = _attested(client)
        claims_json = claims.to_json()
        doc = {"verified": True, "pool": pool, "epoch": st.epoch, "suite": st.suite,
               "pool_public_key": st.pool_public_key.hex(), "worker_identity_key": st.worker_identity_key.hex(),
               "config_digest": st.config_digest.hex(), "claims": claims_json}
        if as_json:
            click.echo(json.dumps(doc, indent=2))
            return
        click.echo(f"verified pool {pool!r} (epoch {st.epoch}) against {policy}")
        for key, value in claims_json.items():
            if key not in ("chain", "collateral"):
                click.echo(f"  {key:<18} {value}")
        for use in claims.collateral:
            click.echo(f"  {'collateral':<18} {describe_collateral_use(use)}")
        click.echo(f"  {'pool key':<18} {st.pool_public_key.hex()}")
        if claims.platform in ("sgx", "tdx", "snp") and not claims.tcb_evaluated:
            click.echo(f"WARNING: the pool's {claims.platform} TCB was not evaluated: the policy accepts evidence "
                       "without collateral (require_collateral = false)", err=True)
        if claims.simulated:
            click.echo("WARNING: simulated evidence -- no confidentiality against the machine's operator", err=True)


@click.group("model")
def model_group() -> None:
    """Upload, list and delete models on a pool (bytes travel sealed to the attested pool)."""


@model_group.command("upload")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_connection_options
@_key_option("The model owner's key file: signs the upload. Only this key can later delete the model or "
             "replace its manifest.")
@click.option("--allow-producer", "allowed", multiple=True, metavar="KEY",
              help="Let only this producer public key (64 hex characters, or a key file) run the model. Repeat "
                   "for several producers; without it every producer the pool serves may run it.")
def model_upload(file: Path, broker_url: str, pool: str, policy: Path, timeout: float, owner_key: Path | None,
                 allowed: tuple[str, ...]) -> None:
    """Upload FILE.onnx in sealed chunks; print the model id (SHA-256) alone on the last line.

    \b
    Every chunk is sealed to the attested pool and carries a manifest signed by
    the owner key (model id, size, owner, allowed producers). Workers refuse an
    upload whose signature does not verify, and a replacement or delete by any
    other key. Uploading the same model again with the same owner key replaces
    its allow-list. A progress bar shows the chunks confirmed by the pool.

    \b
    The owner key, like ssh's: --owner-key FILE, else $ENCLAVEQ_OWNER_KEY (a key
    file), else the default $ENCLAVEQ_HOME/owner.key (ENCLAVEQ_HOME defaults to
    ~/.config/enclaveq). The first upload without a key creates the default
    (mode 0600, directory 0700) and names it on stderr: keep it, it is the only
    key that can later delete or replace the model.

    \b
    Examples:
      enclaveq model upload model.onnx --broker amqp://guest:guest@127.0.0.1:5672/ \\
          --pool demo --policy policy.toml        # signed with the default owner key
      enclaveq keys generate --out owner.key
      enclaveq model upload model.onnx --broker amqp://guest:guest@127.0.0.1:5672/ \\
          --pool demo --policy policy.toml --owner-key owner.key
    """
    try:
        allowed_keys = [parse_public_key(k) for k in allowed] or None
    except ProtocolError as exc:
        _fail(str(exc), 2)
    if file.stat().st_size == 0:
        _fail(f"{file}: the file is empty, not an ONNX model", 2)
    source = find_owner_key(owner_key)
    # An existing key is checked before connecting; the default one is created only once the pool attests.
    key = None if source.creatable else _owner_key(source)
    with _client(broker_url, pool, policy, timeout) as client:
        if key is None:
            key = _owner_key(source, create=True)
        with _progress() as bar:
            size = file.stat().st_size
            task = bar.add_task(f"uploading {file.name} ({size / 1e6:.1f} MB)", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)
            try:
                model_id = client.upload_model(file, owner_key=key, allowed_producers=allowed_keys,
                                               progress=progress)
            except EnclaveqError as exc:
                _fail(str(exc))
    click.echo(model_id)


@click.group("pool")
def pool_group() -> None:
    """Operate on a worker pool as a whole (key rotation, members' status)."""


@pool_group.command("rotate")
@_connection_options
@click.option("--grace", type=DURATION, default="5m", show_default=True,
              help="How long jobs sealed to the current key are still served (e.g. 30s, 5m, 1h). At most "
                   "the pool's measured max_rotation_grace_seconds (1h by default): a longer one is refused.")
def pool_rotate(broker_url: str, pool: str, policy: Path, timeout: float, grace: float) -> None:
    """Rotate the pool's key: every worker moves to a new epoch key (P6, forward secrecy by epoch).

    \b
    The command attests the pool against --policy first, then asks one worker
    to draw a new epoch key; that worker hands it to every other member, sealed
    to the current key and vouched for by its own evidence. Producers pick up
    the new key from their next results without failing a job: jobs already
    sealed to the old key are served during the grace period, and a job that
    arrives after it is sent again under the new key. After the grace period
    every worker erases the old private key from memory and from sealed state,
    so traffic captured before the rotation can no longer be opened, even with
    a worker's full sealed state.

    \b
    Prints the new epoch and when the old key is erased.

    \b
    Example:
      enclaveq pool rotate --broker amqp://guest:guest@127.0.0.1:5672/ --pool demo \\
          --policy policy.toml --grace 10m
    """
    with _client(broker_url, pool, policy, timeout) as client:
        before = _attested(client)[1].epoch
        try:
            epoch, retire_at_ms = client.rotate_pool(grace_seconds=int(grace))
        except EnclaveqError as exc:
            _fail(str(exc))
    erased = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(retire_at_ms / 1000))
    click.echo(f"pool {pool!r} rotated from epoch {before} to epoch {epoch}; epoch {before}'s key is erased "
               f"at {erased} (grace {int(grace)}s)")


@pool_group.command("status")
@connection_options(timeout_help="Seconds to wait for the broker to connect and take the request; also the "
                                 "request's deadline, after which a member refuses it.")
@click.option("--wait", type=click.FloatRange(min=0, min_open=True, max=MAX_STATUS_WAIT_SECONDS), default=2.0,
              show_default=True, metavar="SECONDS",
              help="How long to collect the members' answers after asking (a member that answers later is "
                   "not listed).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def pool_status(broker_url: str, pool: str, policy: Path, timeout: float, wait: float, as_json: bool) -> None:
    """Show the pool's attested members: epoch, models, load, readiness.

    \b
    The command attests the pool against --policy first, then asks every
    member at once; each answers for itself, sealed to this command's session,
    so only a producer that verified the pool can read the answers. One row per
    member that answered within --wait seconds (at most 256): its worker id,
    platform and measurement, the epoch it serves (highlighted when it is not
    the attested one), the models this producer may see, its pipelines, jobs
    running now out of its slots, jobs run since it started (ok and failed),
    uptime and batching (max rows per ONNX Runtime call). --json adds the model
    ids and the full measurement. An answer that does not decode is skipped
    and counted on stderr. Exit 0 when at least one member answered, 1 when
    none did.

    \b
    Examples:
      enclaveq pool status --broker amqp://guest:guest@127.0.0.1:5672/ --pool demo --policy policy.toml
      enclaveq pool status --broker amqp://guest:guest@127.0.0.1:5672/ --pool demo --policy policy.toml \\
          --wait 5 --json
    """
    with _client(broker_url, pool, policy, timeout) as client:
        attested_epoch = _attested(client)[1].epoch
        try:
            members = client.pool_status(wait)
        except EnclaveqError as exc:
            _fail(str(exc))
        skipped = client.skipped_status_answers
    if as_json:
        click.echo(json.dumps({"pool": pool, "epoch": attested_epoch, "wait_seconds": wait,
                               "members": [m.to_json() for m in members], "skipped": skipped}, indent=2))
    else:
        if members:
            _print_members(members, attested_epoch)
        click.echo(f"{len(members)} member{'s' if len(members) != 1 else ''} of pool {pool!r} answered within "
                   f"{wait:g}s (attested epoch {attested_epoch})", err=True)
    if skipped:
        click.echo(f"warning: {skipped} answer{'s' if skipped != 1 else ''} did not decode and "
                   f"{'were' if skipped != 1 else 'was'} skipped", err=True)
    if not members:
        _fail(f"no member of pool {pool!r} answered the status request within {wait:g}s")


def _print_members(members: list[MemberStatus], attested_epoch: int) -> None:
    """One table row per member, on stdout. Every text a member sent is printed as plain text
    (rich markup in a worker id is shown, never interpreted)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if not console.is_terminal:
        # A pipe or a file: one line per member, never wrapped, cut or missing a column, however long
        # its worker id (a table only takes the width its cells need).
        console = Console(width=1 << 20)
    table = Table(box=None, pad_edge=False)
    for column in ("WORKER", "PLATFORM", "MEASUREMENT", "EPOCH", "READY", "MODELS", "PIPELINES", "IN FLIGHT",
                   "OK", "FAILED", "UPTIME", "BATCH ROWS"):
        table.add_column(column, no_wrap=True, justify="left" if column in ("WORKER", "PLATFORM", "MEASUREMENT")
                         else "right")
    for m in members:
        table.add_row(Text(m.worker_id), Text(m.platform), Text(m.measurement.hex()[:16] + "..."),
                      Text(str(m.epoch), style="" if m.epoch == attested_epoch else "bold yellow"),
                      Text("yes") if m.ready else Text("no", style="bold red"), str(m.model_count),
                      str(m.pipelines), f"{m.jobs_in_flight}/{m.max_jobs_in_flight}", str(m.jobs_ok),
                      str(m.jobs_failed), _uptime(m.uptime_seconds), str(m.max_batch_rows))
    console.print(table)


def _uptime(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@model_group.command("list")
@_connection_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def model_list(broker_url: str, pool: str, policy: Path, timeout: float, as_json: bool) -> None:
    """List the models loaded on a pool, with their inputs and outputs.

    \b
    Examples:
      enclaveq model list --broker amqp://guest:guest@127.0.0.1:5672/ --pool demo --policy policy.toml
      enclaveq model list --broker amqp://guest:guest@127.0.0.1:5672/ --pool demo --policy policy.toml --json
    """
    with _client(broker_url, pool, policy, timeout) as client:
        try:
            models = client.list_models()
        except EnclaveqError as exc:
            _fail(str(exc))
    if as_json:
        click.echo(json.dumps([{"id": m.model_id, "size": m.size, "inputs": m.inputs, "outputs": m.outputs}
                               for m in models], indent=2, default=list))
        return
    if not models:
        click.echo(f"no models on pool {pool!r} (that this producer may see)", err=True)
    for m in models:
        ins = ", ".join(f"{n}:{t}{list(s)}" for n, t, s in m.inputs)
        outs = ", ".join(f"{n}:{t}{list(s)}" for n, t, s in m.outputs)
        click.echo(f"{m.model_id}  {m.size:>10} B  in: {ins}  out: {outs}")


@model_group.command("delete")
@click.argument("model_id")
@_connection_options
@_key_option("The key file that signed the model's upload: only its owner can delete it.")
def model_delete(model_id: str, broker_url: str, pool: str, policy: Path, timeout: float,
                 owner_key: Path | None) -> None:
    """Delete MODEL_ID from every worker of the pool and from their sealed storage.

    The delete order is signed by the owner key; workers refuse it from any other key. Workers
    that are down at the time delete the model when they come back (members hand them the
    signed order).

    \b
    The owner key is found as for `model upload`: --owner-key FILE, else
    $ENCLAVEQ_OWNER_KEY, else the default $ENCLAVEQ_HOME/owner.key. It is never
    created here: without one the command fails (exit 2) naming the file it
    looked for.

    \b
    Examples:
      enclaveq model delete MODEL_ID --broker amqp://guest:guest@127.0.0.1:5672/ \\
          --pool demo --policy policy.toml        # the default owner key
      enclaveq model delete MODEL_ID --broker amqp://guest:guest@127.0.0.1:5672/ \\
          --pool demo --policy policy.toml --owner-key owner.key
    """
    _check_model_id(model_id)
    key = _owner_key(find_owner_key(owner_key))
    with _client(broker_url, pool, policy, timeout) as client:
        try:
            client.delete_model(model_id, owner_key=key)
        except EnclaveqError as exc:
            _fail(str(exc))
    click.echo(f"deleted {model_id}")


def _parse_inputs(specs: tuple[str, ...]) -> dict[str, np.ndarray]:
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{spec!r}: expected NAME=FILE.npy", param_hint="--input")
        try:
            loaded = np.load(path, allow_pickle=False)
        except OSError as exc:
            raise click.BadParameter(f"{path}: not a readable .npy file ({exc.strerror or exc})",
                                     param_hint="--input") from None
        except (ValueError, EOFError):  # numpy's "pickled data" (EOFError: an empty file): say what it is not
            raise click.BadParameter(f"{path}: not a .npy file (save one with numpy.save)",
                                     param_hint="--input") from None
        if not isinstance(loaded, np.ndarray):  # an .npz archive: several arrays, one input each
            loaded.close()
            raise click.BadParameter(f"{path}: an .npz archive, not a .npy file: give each array as its own "
                                     "--input NAME=FILE.npy, or use `enclaveq submit --inputs DIR` for .npz files",
                                     param_hint="--input")
        try:
            dtype_name(loaded)
        except TensorError as exc:
            raise click.BadParameter(f"{path}: {exc}", param_hint="--input") from None
        inputs[name] = loaded
    return inputs


_MODEL_ID = re.compile(r"[0-9a-f]{64}")


def _check_model_id(model_id: str) -> None:
    """A model id is the SHA-256 of the model file in lower-case hex (what `model upload` printed)."""
    if not _MODEL_ID.fullmatch(model_id):
        hint = " (model ids are lower case)" if _MODEL_ID.fullmatch(model_id.lower()) else ""
        _fail(f"{model_id!r} is not a model id: expected the 64 hex characters `model upload` printed{hint}", 2)


def _check_output_file(output: Path, *, option: str = "", holds: str = "the result (.npz)",
                       written_in_place: bool = False) -> None:
    """Fail before anything is sent when ``output`` could not be written (exit 2): its directory
    exists and takes new files; a file already there is replaced by rename (a result), or, when
    ``written_in_place`` (submit's --failures list), must open for writing itself."""
    what = f"{option} {output}".strip()
    folder = output.parent
    if not folder.is_dir():
        _fail(f"{what}: {folder} is not a directory" if folder.exists() else
              f"{what}: the directory {folder} does not exist", 2)
    if output.is_dir():
        _fail(f"{what}: is a directory; give a file name for {holds}", 2)
    if written_in_place and output.exists():
        try:  # opened as it will be written, without changing what it holds
            os.close(os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))
        except OSError as exc:
            _fail(f"{what}: cannot write it ({exc.strerror or type(exc).__name__})", 2)
        return
    _check_writable(folder, what)


def _check_writable(folder: Path, what: str) -> None:
    probe = folder / f".enclaveq-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        _fail(f"{what}: cannot write in {folder} ({exc.strerror or type(exc).__name__})", 2)


@click.command("run")
@_connection_options
@click.option("--model", "model_id", required=True, help="Model id (SHA-256 hex) to run.")
@click.option("--input", "input_specs", multiple=True, required=True, metavar="NAME=FILE.npy",
              help="A named input tensor; repeat for several inputs.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the outputs (.npz, one array per output name).")
def run_command(broker_url: str, pool: str, policy: Path, timeout: float, model_id: str,
                input_specs: tuple[str, ...], output: Path) -> None:
    """Run one job and write its outputs to an .npz file.

    \b
    Example:
      python -c 'import numpy as np; np.save("x.npy", np.ones((1, 4), np.float32))'
      enclaveq run --broker amqp://guest:guest@127.0.0.1:5672/ --pool demo --policy policy.toml \\
          --model MODEL_ID --input x=x.npy --output result.npz
    """
    _check_model_id(model_id)
    _check_output_file(output)
    inputs = _parse_inputs(input_specs)
    with _client(broker_url, pool, policy, timeout) as client:
        try:
            outputs = client.run(model_id, inputs)
        except EnclaveqError as exc:
            _fail(str(exc))
    write_npz(output, outputs)  # every output name round-trips; 0600, never through a symlink
    for name, value in outputs.items():
        click.echo(f"{name}: {value.dtype}{list(value.shape)}")


@click.command("submit")
@_connection_options
@click.option("--model", "model_id", required=True, help="Model id (SHA-256 hex) to run.")
@click.option("--inputs", "inputs_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Directory of .npz files: each file is one job, its array names are the input names.")
@click.option("--output", "output_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the results: one .npz per job, with the input's file name.")
@click.option("--max-in-flight", type=click.IntRange(min=1), default=256, show_default=True,
              help="Jobs outstanding at once.")
@click.option("--frame-jobs", type=click.IntRange(min=0, max=MAX_FRAME_JOBS), default=None, metavar="N",
              help="Jobs per sealed message (frame). Default: a quarter of --max-in-flight, at most 64; "
                   "0: one message per job.")
@click.option("--frame-bytes", type=click.IntRange(min=1024), default=FrameSettings.max_bytes, show_default=True,
              metavar="B", help="Bytes of job inputs per frame at most.")
@click.option("--linger-ms", type=click.FloatRange(min=0), default=FrameSettings.linger * 1000, show_default=True,
              metavar="MS", help="How long a frame waits for more jobs once it has one.")
@click.option("--failures", "failures_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="FILE.json", help="Also write the failed jobs to FILE.json: [{\"file\", \"error\", \"code\"}].")
def submit_command(broker_url: str, pool: str, policy: Path, timeout: float, model_id: str, inputs_dir: Path,
                   output_dir: Path, max_in_flight: int, frame_jobs: int | None, frame_bytes: int,
                   linger_ms: float, failures_file: Path | None) -> None:
    """Run every .npz in a directory as a batch; write one result .npz per job.

    Jobs travel packed into frames, many per sealed message (see --frame-jobs); each keeps its
    own result and error. Prints a progress bar and a final summary line with jobs, failures and
    jobs/s; exits 1 if any job failed (each failure is named on stderr, a file that is not a
    readable .npz too, and the others still run).

    Run again with the same --output, it sends only the jobs without a result there: each result
    file is written whole (under a temporary name, then renamed), so one that exists is complete.
    If the first run was killed, the second also collects the results that reached the batch's
    own reply queue meanwhile, and sends jobs that may still be queued again under their first
    id, so a worker that already ran them does not run them twice (the journal
    .enclaveq-journal in --output holds the batch's session keys, 0600; it is deleted when the
    batch completes, and the queue expires a day after it was last used). An --output holding
    results of another model is refused. Ctrl-C stops sending, keeps every result already
    written and exits 130.

    \b
    Example:
      enclaveq submit --broker amqp://guest:guest@127.0.0.1:5672/ --pool demo --policy policy.toml \\
          --model MODEL_ID --inputs jobs/ --output results/
    """
    frames: FrameSettings | Literal[False] = False if frame_jobs == 0 else FrameSettings(
        max_jobs=frame_jobs, max_bytes=frame_bytes, linger=linger_ms / 1000)
    files = sorted(inputs_dir.glob("*.npz"))
    if not files:
        _fail(f"no .npz files in {inputs_dir}", 2)
    _check_model_id(model_id)
    if failures_file is not None:
        _check_output_file(failures_file, option="--failures", holds="the list of failed jobs (.json)",
                           written_in_place=True)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(f"{output_dir}: cannot create the output directory ({exc.strerror or type(exc).__name__})", 2)
    _check_writable(output_dir, f"--output {output_dir}")
    todo = _jobs_without_results(files, output_dir, model_id, pool)
    journal = _batch_journal(output_dir, files)
    if len(todo) < len(files):
        click.echo(f"{len(files) - len(todo)} of {len(files)} results are already in {output_dir} (an earlier run): "
                   f"sending the other {len(todo)}", err=True)
    if not todo:
        journal.discard()
        click.echo(f"jobs: 0  failed: 0  0.0 jobs/s (all {len(files)} results were already in {output_dir})")
        return
    producer_key = producer_key_option()
    started = time.perf_counter()
    # The AsyncClient on this thread's own loop: the synchronous Client would add a thread hop per
    # result and read the inputs on its loop's thread; here one thread reads the files ahead, one
    # writes the results behind (enclaveq.cli.npz_files), and the loop only seals, sends and decodes.
    collateral = collateral_of_command()
    client = attested(broker_url, pool, lambda: AsyncClient(broker_url, pool, policy, timeout=timeout,
                                                            producer_key=producer_key, collateral=collateral))
    failed: list[dict[str, Any]] = []
    try:
        asyncio.run(_submit_files(client, broker_url, pool, model_id, files, set(todo), output_dir, max_in_flight,
                                  frames, failed, journal))
    except KeyboardInterrupt:
        journal.close()
        kept = sum(1 for path in todo if (output_dir / path.name).exists())
        click.echo(f"interrupted: {kept} results of this run are written in {output_dir}; run the same command "
                   f"again to send only the {len(todo) - kept} jobs without a result", err=True)
        _write_failures(failures_file, failed)
        raise Interrupted from None  # said above: the entry point exits 130 without saying it again
    except BaseException:
        journal.close()
        raise
    # Every result received is written (or its failure named): the journal's work is done.
    journal.discard()
    elapsed = time.perf_counter() - started
    if journal.collected or journal.resent or journal.sent_anew:
        click.echo(f"resumed: {journal.collected} results collected from the batch's reply queue, {journal.resent} "
                   f"jobs sent again under their first id, {journal.sent_anew} sent anew", err=True)
    _write_failures(failures_file, failed)
    click.echo(f"jobs: {len(todo)}  failed: {len(failed)}  {len(todo) / elapsed:.1f} jobs/s")
    if failed:
        sys.exit(1)


JOURNAL_NAME = ".enclaveq-journal"  # in a submit --output: the batch's journal while it runs


def _batch_journal(output_dir: Path, files: list[Path]) -> BatchJournal:
    """The journal that lets a killed submit be resumed (producer_sdk.journal), for exactly this
    list of inputs: one written for another list (inputs added or removed since) is set aside --
    the jobs it waited for are sent anew, and its reply queue expires by itself."""
    digest = hashlib.sha256("\0".join(path.name for path in files).encode()).hexdigest()
    path = output_dir / JOURNAL_NAME
    try:
        return BatchJournal(path, batch=digest, auto_keep=False)
    except BatchJournalError as exc:
        click.echo(f"warning: {exc}: starting a new journal (results the old one waited for are computed again)",
                   err=True)
    try:
        path.unlink()
    except OSError as exc:
        _fail(f"{path}: cannot remove the old journal ({exc.strerror or type(exc).__name__})", 2)
    return BatchJournal(path, batch=digest, auto_keep=False)


BATCH_MARK = ".enclaveq-batch.json"  # in a submit --output: whose results it holds


def _jobs_without_results(files: list[Path], output_dir: Path, model_id: str, pool: str) -> list[Path]:
    """The input files whose result is not in ``output_dir`` yet. The directory is marked with the
    model and pool its results came from: a rerun must not mix in another model's results."""
    mark = output_dir / BATCH_MARK
    if mark.exists():
        try:
            held = json.loads(mark.read_text())
            held_model = held["model"]
        except (OSError, ValueError, KeyError, TypeError):
            _fail(f"{mark}: not a batch record enclaveq wrote; use another --output", 2)
        if held_model != model_id:
            _fail(f"{output_dir} holds results of model {held_model}, not {model_id}: use another --output "
                  "(or remove those results)", 2)
    else:
        mark.write_text(json.dumps({"model": model_id, "pool": pool}) + "\n")
    for partial in output_dir.glob(f"{TEMP_PREFIX}*"):  # left by a run that was killed mid-write
        partial.unlink(missing_ok=True)
    # A result is a regular file submit wrote (whole, by rename): anything else at its name -- a
    # symbolic link someone planted, a directory -- is not a result, and the job runs (its result
    # then replaces a link without following it).
    done = {entry.name for entry in os.scandir(output_dir) if entry.is_file(follow_symlinks=False)}
    return [path for path in files if path.name not in done]


def _write_failures(path: Path | None, failed: list[dict[str, Any]]) -> None:
    if path is None:
        return
    try:
        path.write_text(json.dumps(failed, indent=2) + "\n")
    except OSError as exc:
        click.echo(f"error: could not write --failures {path}: {exc.strerror or type(exc).__name__}", err=True)


_PROGRESS_INTERVAL = 0.1  # seconds between progress bar updates: redrawing per job costs more than a job


async def _submit_files(client: AsyncClient, broker_url: str, pool: str, model_id: str, files: list[Path],
                        todo: set[Path], output_dir: Path, max_in_flight: int,
                        frames: FrameSettings | Literal[False], failed: list[dict[str, Any]],
                        journal: BatchJournal) -> None:
    """Connect (attesting the pool), run one job per file of ``todo`` (the batch is all ``files``,
    so that a job keeps its index from run to run), write each result and mark it kept in the
    journal; each failure is appended to ``failed`` (file, error, code)."""
    try:
        await client.connect()
    except (EnclaveqError, AttestationError, ProtocolError) as exc:
        _refused(broker_url, pool, exc)
    try:
        with _progress() as bar:
            task = bar.add_task("jobs", total=len(todo))

            def fail(name: str, error: object) -> None:  # also called by the writer's thread
                failed.append({"file": name, "error": str(error), "code": getattr(error, "code", None)})
                # One line whatever its length (rich wraps at the console's width, 80 columns on a
                # pipe), and the text as it is: a file name or an error is never read as markup.
                bar.console.print(f"failed: {name}: {error}", soft_wrap=True, markup=False, highlight=False,
                                  emoji=False)

            unreadable = 0
            to_read = [path for path in files if path in todo]

            def batch() -> Iterator[dict[str, np.ndarray] | None]:
                nonlocal unreadable
                read = iter(reader)
                for path in files:
                    if path not in todo:
                        yield None  # its result is in --output: skipped, the indexes stay
                        continue
                    _, inputs = next(read)  # waits (on the loop) only when the reader is behind
                    if isinstance(inputs, Exception):
                        unreadable += 1
                        fail(path.name, f"not a readable .npz file ({inputs})")
                        yield None
                        continue
                    yield inputs

            window = max(64, max_in_flight)
            reader = ReadAhead(to_read, files=window)
            index_of = {path.name: index for index, path in enumerate(files)}
            # Results come a frame at a time: the writer is woken once per burst (flush, scheduled
            # when the loop next turns) or when a frame's worth waits, not per result.
            writer = ResultWriter(output_dir, lambda name, exc: fail(name, f"could not write {output_dir / name}: {exc}"),
                                  results=window, written=lambda names: journal.kept(*(index_of[n] for n in names)),
                                  wake_at=max(1, window // 4))
            loop = asyncio.get_running_loop()
            flush_due = False

            def flush() -> None:
                nonlocal flush_due
                flush_due = False
                writer.flush()

            shown, done = time.perf_counter(), 0
            try:
                # submit is an async generator: closing it on the way out stops its feeder and tasks.
                jobs = cast(AsyncGenerator[JobResult, None], client.submit(
                    model_id, batch(), frames=frames, max_in_flight=max_in_flight, resume=journal))
                async with contextlib.aclosing(jobs) as results:
                    async for result in results:
                        name = files[result.index].name
                        if result.ok and result.outputs is not None:
                            writer.put(name, result.outputs)  # waits only when the writer is behind
                            if not flush_due:
                                flush_due = True
                                loop.call_soon(flush)
                        else:
                            fail(name, result.error)
                        done += 1
                        if (now := time.perf_counter()) - shown >= _PROGRESS_INTERVAL:
                            bar.update(task, completed=done + unreadable)
                            shown = now
            except BatchJournalError as exc:  # e.g. --output holds the journal of a batch on another pool
                _fail(f"{exc}", 2)
            except EnclaveqError as exc:  # the batch's reply queue could not be opened
                _fail(f"the batch stopped: {exc}; run the same command again to resume it")
            finally:
                reader.close()
                writer.close()  # every result received is written before the summary
            bar.update(task, completed=done + unreadable)
    finally:
        await client.close()

