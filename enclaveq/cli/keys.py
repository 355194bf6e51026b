"""`enclaveq keys generate|show`: the Ed25519 keys behind model ownership (P7).

One kind of key plays two roles: an *owner key* signs a model's manifest (and later its delete
order), a *producer key* proves which producer opened a session, so an owner can name the
producers allowed to use a model. Private keys stay in 0600 PEM files; everything else (allow
lists, `keys show`) uses the 64-hex-character public key. The public key alone goes to stdout,
hints to stderr, so `$(enclaveq keys show FILE)` works in scripts.
"""

from __future__ import annotations

from pathlib import Path

import click

from protocol.errors import KeyFileError
from protocol.ownership import generate_signing_key, parse_public_key, public_key_bytes, save_signing_key


@click.group("keys")
def keys_group() -> None:
    """Create and inspect Ed25519 keys for model ownership.

    An owner key signs a model's manifest at upload (`model upload --owner-key FILE`); only
    its holder can delete the model. Without --owner-key (or $ENCLAVEQ_OWNER_KEY), `model
    upload` uses, and on first use creates, the default $ENCLAVEQ_HOME/owner.key
    (ENCLAVEQ_HOME defaults to ~/.config/enclaveq); generate keys here to keep one per
    project or role. A producer key identifies a producer (`--producer-key FILE`), so an owner
    can restrict a model to the producers it names by their public key (64 hex characters).

    \b
    Examples:
      enclaveq keys generate --out owner.pem
      enclaveq keys generate --out alice.pem
      enclaveq keys show alice.pem        # the public key to put on an allow-list
    """


@keys_group.command("generate")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Where to write the new private key (PEM, mode 0600). Never overwritten.")
def generate_command(out: Path) -> None:
    """Generate a new Ed25519 private key and print its public key.

    The private key is written to FILE (unencrypted PKCS#8 PEM, readable by you only); an
    existing file is never replaced. The public key (64 hex characters) is printed alone on
    stdout.

    \b
    Examples:
      enclaveq keys generate --out owner.pem       # then: model upload --owner-key owner.pem
      enclaveq keys generate --out producer.pem    # then: --producer-key producer.pem
    """
    key = generate_signing_key()
    try:
        save_signing_key(key, out)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(public_key_bytes(key).hex())
    click.echo(f"Wrote {out} (keep it private). Use it as `model upload --owner-key {out}` or "
               f"`--producer-key {out}`; allow-lists take the public key above.", err=True)


@keys_group.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def show_command(file: Path) -> None:
    """Print the public key (64 hex characters) of a key file.

    FILE is a PEM Ed25519 private key (as written by `keys generate`) or public key. The
    private key is never printed.

    \b
    Examples:
      enclaveq keys show owner.pem
      ALICE=$(enclaveq keys show alice.pem)
    """
    try:
        click.echo(parse_public_key(file).hex())
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
