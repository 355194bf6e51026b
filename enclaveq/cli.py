"""The `enclaveq` command: one group gathering each package's commands."""

from __future__ import annotations

import sys

import click

from attestation.cli import policy_cli as policy_group, sim_cli as sim_group
from attestation.evidence_cli import evidence_group
from enclave_worker.cli import worker_command
from producer_sdk.cli import attest_command, model_group, pool_group, run_command, submit_command
from producer_sdk.keys_cli import keys_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="enclaveq")
def cli() -> None:
    """enclaveq: confidential ONNX inference as an asynchronous job system.

    Producers verify attestation evidence of a worker pool against their policy, then send
    models and jobs sealed to the pool's attested key through RabbitMQ (or the embedded memory
    broker). The broker, host and operator see only ciphertext.

    \b
    Start here:
      enclaveq demo                     the whole flow in one process
      enclaveq sim init --dir ./sim     a simulated TEE for local use
      enclaveq worker --help            run a worker
    """


@cli.command("demo")
def demo_command() -> None:
    """Run the whole confidential flow in one process (memory broker, simulated TEE, real model)."""
    from .demo import main as demo_main

    sys.exit(demo_main())


cli.add_command(sim_group)
cli.add_command(policy_group)
cli.add_command(evidence_group)
cli.add_command(worker_command)
cli.add_command(attest_command)
cli.add_command(model_group)
cli.add_command(run_command)
cli.add_command(submit_command)
cli.add_command(pool_group)
cli.add_command(keys_group)


def main() -> None:
    cli()
