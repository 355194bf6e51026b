"""`enclaveq sim init` and `enclaveq policy init`: simulation directories and development policies.

The main ``enclaveq`` command registers :data:`sim_cli` and :data:`policy_cli`; this module
only turns arguments into calls of :mod:`attestation.sim.init` and :mod:`attestation.policy`
(and, for the default measurement, :mod:`enclave_worker.measurement`) and errors into clear
one-line messages (exit status 1), never tracebacks.
"""

from __future__ import annotations

from pathlib import Path

import click

from attestation.errors import PolicyError, SimDirError, SimDirExists
from attestation.policy import Policy, write_policy
from attestation.sim.init import init_sim_dir
from attestation.sim.simdir import (
    ATTESTATION_CERT,
    ATTESTATION_KEY,
    PLATFORM_SECRET,
    ROOT_CERT,
    open_sim_dir,
)

from .exits import InputError

__all__ = ["sim_cli", "policy_cli"]

_NO_CONFIDENTIALITY = (
    "WARNING: simulation gives NO confidentiality: the host can read the attestation key, "
    "the platform secret and everything a simulated worker processes. Development only."
)

_DESCRIPTIONS = {
    ROOT_CERT: "simulation root certificate (public; its fingerprint goes into policies)",
    ATTESTATION_KEY: "attestation signing key (mode 0600)",
    ATTESTATION_CERT: "attestation certificate, issued by the root",
    PLATFORM_SECRET: "simulated CPU fuse secret that sealing keys derive from (mode 0600)",
}


@click.group(name="sim")
def sim_cli() -> None:
    """Simulated TEE for development and CI.

    A simulation directory plays the hardware's part: a root certificate, an attestation key
    that signs evidence, and a platform secret for sealing. Workers started with it produce
    evidence that verifies exactly like hardware evidence, but only under a policy that opts in
    to simulation, and every acceptance is logged as a warning. It gives NO confidentiality.
    """


@sim_cli.command(name="init", short_help="Create a simulation directory (root, attestation key, platform secret).")
@click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to create, or fill if it holds no simulation files yet (other files in it are left as "
    "they are). Keep it private: it holds the attestation key.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing simulation directory. This makes a new root, so policies that "
    "pinned the old root fingerprint stop trusting it.",
)
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=3650,
    show_default=True,
    help="Validity of the root and attestation certificates.",
)
def sim_init(directory: Path, force: bool, days: int) -> None:
    """Create a simulation directory: root CA, attestation key and certificate, platform secret.

    Prints the files it created and the root's SHA-256 fingerprint, which a policy pins in
    [simulation] root_sha256 (`enclaveq policy init --sim-dir DIR` does that for you). The
    root's private key is used once to certify the attestation key and then discarded: nobody
    needs it afterwards, and a leaked directory cannot mint new certificates under the root.

    \b
    Example:
      enclaveq sim init --dir ./sim
      enclaveq policy init --sim-dir ./sim --out policy.toml
    """
    if force and directory.exists() and any(directory.iterdir()):
        click.echo(f"warning: replacing {directory}: workers' sealed state made with the old directory (their "
                   "pool key and models, e.g. under its state/) will no longer unseal, and policies that pinned "
                   "the old root stop trusting the new one", err=True)
    try:
        created = init_sim_dir(directory, days=days, force=force)
    except SimDirExists as exc:  # the library's advice names its keyword; a user needs the option
        raise InputError(f"{exc.path} already holds a simulation directory ({', '.join(exc.existing)}); pass --force "
                         "to replace it, which changes the root fingerprint") from None
    except SimDirError as exc:
        raise InputError(str(exc)) from None
    click.echo(f"Created simulation directory {created.path}:")
    for path in created.files:
        click.echo(f"  {path.name:<22} {_DESCRIPTIONS[path.name]}")
    click.echo("The root private key was not kept: nobody needs it after init.")
    click.echo(f"Root SHA-256 fingerprint: {created.root_sha256}")
    click.echo(_NO_CONFIDENTIALITY, err=True)
    click.echo(f"Next: enclaveq policy init --sim-dir {created.path} --out policy.toml")


@click.group(name="policy")
def policy_cli() -> None:
    """Attestation policies: what evidence a producer accepts before sending any data.

    A policy is a TOML file (format in docs/policy.md) listing the allowed worker
    measurements, the minimum security version, whether debug TEEs are acceptable, how fresh
    evidence must be, and which platforms' roots to trust.
    """


@policy_cli.command(name="init", short_help="Write a development policy that trusts a simulation directory.")
@click.option(
    "--sim-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Simulation directory whose root the policy trusts (from `enclaveq sim init`).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Policy file to write.",
)
@click.option(
    "--measurement",
    "measurements",
    multiple=True,
    metavar="HEX",
    help="Allowed worker measurement (64 or 96 hex digits). Repeat to allow several. "
    "Default: the measurement of this installation's worker with its default configuration.",
)
@click.option(
    "--allow-debug",
    is_flag=True,
    help="Also accept evidence from debug-mode TEEs (whose memory the host can inspect).",
)
@click.option(
    "--max-age",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    metavar="SECONDS",
    help="Oldest evidence to accept, in seconds.",
)
@click.option("--force", is_flag=True, help="Replace an existing policy file.")
def policy_init(
    sim_dir: Path,
    out: Path,
    measurements: tuple[str, ...],
    allow_debug: bool,
    max_age: int,
    force: bool,
) -> None:
    """Write a development policy that trusts a simulation directory.

    The policy allows simulation ([simulation] allow = true), pins the simulation root's
    fingerprint, and allows the given measurements, or by default the current worker's
    measurement (its code plus the default WorkerConfig). Any change to the worker's code or
    measured configuration changes that measurement: re-run this command after upgrading.

    \b
    Examples:
      enclaveq policy init --sim-dir ./sim --out policy.toml
      enclaveq policy init --sim-dir ./sim --out policy.toml --force --measurement HEX
    """
    try:
        root_sha256 = open_sim_dir(sim_dir).sim_dir.root_sha256
    except SimDirError as exc:
        raise InputError(str(exc)) from None
    if not measurements:
        # Imported here: loading the worker's code to measure it is slow, and only this default needs it.
        from enclave_worker.config import DEFAULT_WORKER_CONFIG
        from enclave_worker.measurement import measure_worker

        measurements = (measure_worker(DEFAULT_WORKER_CONFIG).hex(),)
    try:
        policy = Policy(
            measurements=tuple(measurements),
            allow_simulation=True,
            sim_root_sha256=root_sha256,
            debug_allowed=allow_debug,
            max_evidence_age_seconds=max_age,
        )
    except PolicyError as exc:
        raise click.BadParameter(str(exc), param_hint="--measurement") from None
    try:
        write_policy(out, policy, force=force)
    except FileExistsError:
        raise InputError(f"{out} already exists; pass --force to replace it") from None
    except OSError as exc:
        raise InputError(f"cannot write {out}: {exc.strerror}") from None
    click.echo(f"Wrote policy {out}:")
    click.echo(f"  simulation allowed, trusting root {root_sha256}")
    for m in policy.measurements:
        click.echo(f"  measurement {m}")
    click.echo(f"  debug TEEs {'allowed' if allow_debug else 'refused'}")
    click.echo(f"  evidence at most {max_age} s old; fresh nonce required")
    click.echo(_NO_CONFIDENTIALITY, err=True)
