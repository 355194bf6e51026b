"""Producer commands: `enclaveq attest`, `model upload|list|delete`, `run`, `submit`, `pool rotate`.

Every command attests the pool before it sends anything; every failure is one clear line on
stderr and a non-zero exit (1: refused or failed, 2: usage). Progress goes to stderr so that
stdout stays machine-readable (the model id alone on the last line, JSON with --json).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import click
import numpy as np

from attestation.errors import AttestationError
from enclaveq.durations import DURATION

from protocol.errors import ProtocolError
from protocol.ownership import load_signing_key, parse_public_key

from broker_adapters import redact_url
from .client import Client
from .errors import AttestationFailed, EnclaveqError


def _connection_options(fn):
    @click.option("--broker", "broker_url", required=True, metavar="URL",
                  help="Broker URL, e.g. amqp://guest:guest@127.0.0.1:5672/ or memory://NAME.")
    @click.option("--pool", required=True, metavar="NAME", help="Worker pool to use.")
    @click.option("--policy", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="Attestation policy (TOML) the pool's evidence must satisfy.")
    @click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait for each result.")
    @click.option("--producer-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                  help="This producer's key file (`enclaveq keys generate`): proves who sends the jobs, which "
                       "models restricted to some producers require.")
    @functools.wraps(fn)
    def wrapper(*args, producer_key=None, **kwargs):
        click.get_current_context().meta["enclaveq.producer_key"] = producer_key
        return fn(*args, **kwargs)
    return wrapper


def _key_option(name: str, help: str):
    return click.option(name, "owner_key", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                        help=help)


def _client(broker_url: str, pool: str, policy: Path, timeout: float) -> Client:
    try:
        return Client(broker_url, pool, policy, timeout=timeout,
                      producer_key=click.get_current_context().meta.get("enclaveq.producer_key"))
    except AttestationFailed as exc:
        _fail(f"attestation refused for pool {pool!r} at {redact_url(broker_url)}:\n{exc}")
    except (EnclaveqError, AttestationError, ProtocolError) as exc:
        _fail(str(exc))


def _fail(message: str, code: int = 1):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.console import Console
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=False)


@click.command("attest")
@_connection_options
@click.option("--json", "as_json", is_flag=True, help="Print the verified claims as one JSON object.")
def attest_command(broker_url, pool, policy, timeout, as_json):
    """Challenge a pool with a fresh nonce and verify its evidence against POLICY.

    Exit 0 with the verified claims; exit 1 with every violated policy field, its value and
    the expectation.
    """
    try:
        client = Client(broker_url, pool, policy, timeout=timeout)
    except AttestationFailed as exc:
        if as_json:
            click.echo(json.dumps({"verified": False, "pool": pool, "error": str(exc),
                                   "violations": [{"field": v.field, "value": v.value, "expected": v.expected}
                                                  for v in exc.violations]}, indent=2))
            sys.exit(1)
        _fail(str(exc))
    except EnclaveqError as exc:
        _fail(str(exc))
    with client:
        claims, st = client.claims, client.statement
        doc = {"verified": True, "pool": pool, "epoch": st.epoch, "suite": st.suite,
               "pool_public_key": st.pool_public_key.hex(), "worker_identity_key": st.worker_identity_key.hex(),
               "config_digest": st.config_digest.hex(), "claims": claims.to_json()}
        if as_json:
            click.echo(json.dumps(doc, indent=2))
            return
        click.echo(f"verified pool {pool!r} (epoch {st.epoch}) against {policy}")
        for key, value in doc["claims"].items():
            if key != "chain":
                click.echo(f"  {key:<18} {value}")
        click.echo(f"  {'pool key':<18} {st.pool_public_key.hex()}")
        if claims.simulated:
            click.echo("WARNING: simulated evidence -- no confidentiality against the machine's operator", err=True)


@click.group("model")
def model_group():
    """Upload, list and delete models on a pool (bytes travel sealed to the attested pool)."""


@model_group.command("upload")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_connection_options
@_key_option("--owner-key", "The model owner's key file (`enclaveq keys generate`): signs the upload. Only this "
                            "key can later delete the model or replace its manifest.")
@click.option("--allow-producer", "allowed", multiple=True, metavar="KEY",
              help="Let only this producer public key (64 hex characters, or a key file) run the model. Repeat "
                   "for several producers; without it every producer the pool serves may run it.")
def model_upload(file, broker_url, pool, policy, timeout, owner_key, allowed):
    """Upload FILE.onnx in sealed chunks; print the model id (SHA-256) alone on the last line.

    \b
    Every chunk is sealed to the attested pool and carries a manifest signed by
    --owner-key (model id, size, owner, allowed producers). Workers refuse an
    upload whose signature does not verify, and a replacement or delete by any
    other key. Uploading the same model again with the same owner key replaces
    its allow-list. A progress bar shows the chunks confirmed by the pool.

    \b
    Example:
      enclaveq keys generate --out owner.key
      enclaveq model upload model.onnx --broker amqp://guest:guest@127.0.0.1:5672/ \\
          --pool demo --policy policy.toml --owner-key owner.key
    """
    try:
        allowed_keys = [parse_public_key(k) for k in allowed] or None
        key = load_signing_key(owner_key)
    except ProtocolError as exc:
        _fail(str(exc), 2)
    with _client(broker_url, pool, policy, timeout) as client, _progress() as bar:
        size = file.stat().st_size
        task = bar.add_task(f"uploading {file.name} ({size / 1e6:.1f} MB)", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
        try:
            model_id = client.upload_model(file, owner_key=key, allowed_producers=allowed_keys, progress=progress)
        except EnclaveqError as exc:
            _fail(str(exc))
    click.echo(model_id)


@click.group("pool")
def pool_group():
    """Operate on a worker pool as a whole (key rotation)."""


@pool_group.command("rotate")
@_connection_options
@click.option("--grace", type=DURATION, default="5m", show_default=True,
              help="How long jobs sealed to the current key are still served (e.g. 30s, 5m, 1h). The "
                   "pool's measured configuration caps it (default cap: 1h).")
def pool_rotate(broker_url, pool, policy, timeout, grace):
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
        before = client.statement.epoch
        try:
            epoch, retire_at_ms = client.rotate_pool(grace_seconds=int(grace))
        except EnclaveqError as exc:
            _fail(str(exc))
    erased = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(retire_at_ms / 1000))
    click.echo(f"pool {pool!r} rotated from epoch {before} to epoch {epoch}; epoch {before}'s key is erased "
               f"at {erased} (grace {int(grace)}s)")


@model_group.command("list")
@_connection_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def model_list(broker_url, pool, policy, timeout, as_json):
    """List the models loaded on a pool, with their inputs and outputs."""
    with _client(broker_url, pool, policy, timeout) as client:
        try:
            models = client.list_models()
        except EnclaveqError as exc:
            _fail(str(exc))
    if as_json:
        click.echo(json.dumps([{"id": m.model_id, "size": m.size, "inputs": m.inputs, "outputs": m.outputs}
                               for m in models], indent=2, default=list))
        return
    for m in models:
        ins = ", ".join(f"{n}:{t}{list(s)}" for n, t, s in m.inputs)
        outs = ", ".join(f"{n}:{t}{list(s)}" for n, t, s in m.outputs)
        click.echo(f"{m.model_id}  {m.size:>10} B  in: {ins}  out: {outs}")


@model_group.command("delete")
@click.argument("model_id")
@_connection_options
@_key_option("--owner-key", "The key file that signed the model's upload: only its owner can delete it.")
def model_delete(model_id, broker_url, pool, policy, timeout, owner_key):
    """Delete MODEL_ID from every worker of the pool and from their sealed storage.

    The delete order is signed by --owner-key; workers refuse it from any other key. Workers
    that are down at the time delete the model when they come back (members hand them the
    signed order)."""
    try:
        key = load_signing_key(owner_key)
    except ProtocolError as exc:
        _fail(str(exc), 2)
    with _client(broker_url, pool, policy, timeout) as client:
        try:
            client.delete_model(model_id, owner_key=key)
        except EnclaveqError as exc:
            _fail(str(exc))
    click.echo(f"deleted {model_id}")


def _parse_inputs(specs: tuple[str, ...]) -> dict[str, np.ndarray]:
    inputs = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{spec!r}: expected NAME=FILE.npy", param_hint="--input")
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"{path}: not a readable .npy file ({exc})", param_hint="--input")
    return inputs


@click.command("run")
@_connection_options
@click.option("--model", "model_id", required=True, help="Model id (SHA-256 hex) to run.")
@click.option("--input", "input_specs", multiple=True, required=True, metavar="NAME=FILE.npy",
              help="A named input tensor; repeat for several inputs.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the outputs (.npz, one array per output name).")
def run_command(broker_url, pool, policy, timeout, model_id, input_specs, output):
    """Run one job and write its outputs to an .npz file."""
    inputs = _parse_inputs(input_specs)
    with _client(broker_url, pool, policy, timeout) as client:
        try:
            outputs = client.run(model_id, inputs)
        except EnclaveqError as exc:
            _fail(str(exc))
    np.savez(output, **outputs)
    for name, value in outputs.items():
        click.echo(f"{name}: {value.dtype}{list(value.shape)}")


@click.command("submit")
@_connection_options
@click.option("--model", "model_id", required=True, help="Model id (SHA-256 hex) to run.")
@click.option("--inputs", "inputs_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Directory of .npz files: each file is one job, its array names are the input names.")
@click.option("--output", "output_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the results: one .npz per job, with the input's file name.")
@click.option("--max-in-flight", type=int, default=256, show_default=True, help="Jobs outstanding at once.")
def submit_command(broker_url, pool, policy, timeout, model_id, inputs_dir, output_dir, max_in_flight):
    """Run every .npz in a directory as a batch; write one result .npz per job.

    Prints a progress bar and a final summary line with jobs, failures and jobs/s; exits 1 if
    any job failed (each failure is named on stderr).
    """
    files = sorted(inputs_dir.glob("*.npz"))
    if not files:
        _fail(f"no .npz files in {inputs_dir}", 2)
    output_dir.mkdir(parents=True, exist_ok=True)

    def batch():
        for path in files:
            with np.load(path, allow_pickle=False) as data:
                yield {name: data[name] for name in data.files}

    failures = 0
    started = time.perf_counter()
    with _client(broker_url, pool, policy, timeout) as client, _progress() as bar:
        task = bar.add_task("jobs", total=len(files))
        for result in client.submit(model_id, batch(), max_in_flight=max_in_flight):
            name = files[result.index].name
            if result.ok:
                np.savez(output_dir / name, **result.outputs)
            else:
                failures += 1
                bar.console.print(f"failed: {name}: {result.error}")
            bar.advance(task)
    elapsed = time.perf_counter() - started
    click.echo(f"jobs: {len(files)}  failed: {failures}  {len(files) / elapsed:.1f} jobs/s")
    if failures:
        sys.exit(1)
