"""`enclaveq keys generate|show`: the keys behind model ownership (P7) and pipeline results.

Two kinds of key:

- Ed25519 *signing* keys play two roles: an *owner key* signs a model's manifest (and later its
  delete order) or a pipeline definition, a *producer key* proves which producer opened a
  session, so an owner can name the producers allowed to use a model or a pipeline
  (``--kind owner``, the default, and ``--kind producer`` make the same kind of key);
- X25519 *recipient* keys (``--kind recipient``) open pipeline results: a pipeline lists the
  public keys of its recipients, and each result is sealed so that only they read it.

Private keys stay in 0600 PEM files; everything else (allow lists, recipients, `keys show`)
uses the 64-hex-character public key. The public key alone goes to stdout, hints and the kind
of key to stderr, so `$(enclaveq keys show FILE)` works in scripts.
"""

from __future__ import annotations

from pathlib import Path

import click

from producer_sdk.results import generate_recipient_key, recipient_public_key, save_recipient_key
from protocol.errors import KeyFileError
from protocol.ownership import generate_signing_key, parse_public_key, public_key_bytes, save_signing_key
from .exits import InputError

KINDS = ("owner", "producer", "recipient")


@click.group("keys")
def keys_group() -> None:
    """Create and inspect keys: Ed25519 keys for ownership, X25519 keys for pipeline recipients.

    An owner key signs a model's manifest at upload (`model upload --owner-key FILE`) or a
    pipeline definition (`pipeline create --owner-key FILE`); only its holder can delete the
    model or pipeline. Without --owner-key (or $ENCLAVEQ_OWNER_KEY), `model upload` uses, and
    on first use creates, the default $ENCLAVEQ_HOME/owner.key (ENCLAVEQ_HOME defaults to
    ~/.config/enclaveq); generate keys here to keep one per project or role. A producer key
    identifies a producer (`--producer-key FILE`), so an owner can restrict a model to the
    producers it names by their public key (64 hex characters). A recipient key opens the
    results of the pipelines that list its public key (`pipeline init --recipient KEY`,
    `subscribe --key FILE`).

    \b
    Examples:
      enclaveq keys generate --out owner.pem
      enclaveq keys generate --out alice.pem
      enclaveq keys show alice.pem        # the public key to put on an allow-list
      enclaveq keys generate --kind recipient --out dashboard.key
    """


@keys_group.command("generate")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Where to write the new private key (PEM, mode 0600). Never overwritten.")
@click.option("--kind", type=click.Choice(KINDS), default="owner", show_default=True,
              help="owner or producer: an Ed25519 signing key (one kind of key, two roles); recipient: an X25519 "
                   "key that opens pipeline results sealed to it.")
def generate_command(out: Path, kind: str) -> None:
    """Generate a new private key and print its public key.

    The private key is written to FILE (unencrypted PKCS#8 PEM, readable by you only); an
    existing file is never replaced. The public key (64 hex characters) is printed alone on
    stdout.

    \b
    Examples:
      enclaveq keys generate --out owner.pem       # then: model upload --owner-key owner.pem
      enclaveq keys generate --out producer.pem    # then: --producer-key producer.pem
      enclaveq keys generate --kind recipient --out dashboard.key
          # then: pipeline init --recipient <the printed key>, subscribe --key dashboard.key
    """
    try:
        if kind == "recipient":
            recipient = generate_recipient_key()
            save_recipient_key(recipient, out)
            click.echo(recipient_public_key(recipient).hex())
            click.echo(f"Wrote recipient key {out} (keep it private): it opens the results of pipelines that "
                       f"list the public key above (`pipeline init --recipient KEY`); read them with "
                       f"`subscribe --key {out}`.", err=True)
            return
        key = generate_signing_key()
        save_signing_key(key, out)
    except KeyFileError as exc:
        raise InputError(str(exc)) from None
    click.echo(public_key_bytes(key).hex())
    click.echo(f"Wrote {out} (keep it private). Use it as `model upload --owner-key {out}` or "
               f"`--producer-key {out}`; allow-lists take the public key above.", err=True)


@keys_group.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def show_command(file: Path) -> None:
    """Print the public key (64 hex characters) of a key file, and its kind on stderr.

    FILE is a PEM private or public key: an Ed25519 signing key (owner or producer, as written
    by `keys generate`) or an X25519 recipient key (`keys generate --kind recipient`). The
    private key is never printed.

    \b
    Examples:
      enclaveq keys show owner.pem
      ALICE=$(enclaveq keys show alice.pem)
      enclaveq keys show dashboard.key       # kind: recipient (X25519), on stderr
    """
    try:
        public, kind = parse_public_key(file), "signing key: owner or producer (Ed25519)"
    except KeyFileError as signing_error:
        try:
            public, kind = recipient_public_key(file), "recipient (X25519)"
        except KeyFileError:
            # Neither kind: report what was wrong with it as a signing key (missing, unreadable...).
            message = str(signing_error).replace("not a PEM Ed25519 public or private key",
                                                 "not a PEM Ed25519 (signing) or X25519 (recipient) key")
            raise InputError(message) from None
    click.echo(public.hex())
    click.echo(f"kind: {kind}", err=True)
