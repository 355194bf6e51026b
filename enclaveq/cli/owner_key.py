"""Which owner key `enclaveq model upload|delete` and `pipeline create|delete` sign with, the way ssh and
gpg pick a key.

Precedence, first match wins:

1. ``--owner-key FILE`` on the command line;
2. ``$ENCLAVEQ_OWNER_KEY``, the path of a key file;
3. the default key file ``$ENCLAVEQ_HOME/owner.key``, ``ENCLAVEQ_HOME`` defaulting to
   ``~/.config/enclaveq``.

Only the default file is ever created, and only by ``model upload`` (or ``pipeline create``): on
first use, in a 0700 directory, with one line on stderr naming it (it is the only key that can
later delete or replace the model, or the pipeline and its models). ``model delete`` and
``pipeline delete`` never create a key; without one they fail naming the file they looked for.
A key named by the flag or the variable must already exist (``keys generate``).

The key is drawn and written by :func:`protocol.ownership.save_signing_key` (O_CREAT|O_EXCL,
mode 0600 from the first instant) to a private temporary name, then hard-linked into place:
``link`` refuses an existing name, so two first uploads racing each other end with one complete
key file that both use, never a half-written one. Like ssh, an owner key file that its group or
others may access is refused: ``chmod 600`` it.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import stat
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.errors import KeyFileError
from producer_sdk.epochs import DEFAULT_HOME, ENV_HOME, enclaveq_home
from protocol.ownership import generate_signing_key, load_signing_key, save_signing_key

__all__ = [
    "DEFAULT_HOME", "DEFAULT_KEY_NAME", "ENV_HOME", "ENV_OWNER_KEY", "OwnerKeyError", "OwnerKeySource",
    "default_owner_key_path", "enclaveq_home", "find_owner_key", "load_owner_key",
]

ENV_OWNER_KEY = "ENCLAVEQ_OWNER_KEY"
DEFAULT_KEY_NAME = "owner.key"

FLAG, ENV, DEFAULT = "--owner-key", ENV_OWNER_KEY, "default"


class OwnerKeyError(Exception):
    """No usable owner key; the message is one line naming the file (never its contents)."""


@dataclasses.dataclass(frozen=True)
class OwnerKeySource:
    """Where the owner key comes from: ``origin`` is ``--owner-key``, ``ENCLAVEQ_OWNER_KEY`` or ``default``."""

    path: Path
    origin: str

    @property
    def creatable(self) -> bool:
        """True for the default key file that does not exist yet (``model upload`` creates it)."""
        return self.origin == DEFAULT and not os.path.lexists(self.path)

    def describe(self) -> str:
        if self.origin == FLAG:
            return f"{self.path} (--owner-key)"
        if self.origin == ENV:
            return f"{self.path} (from ${ENV_OWNER_KEY})"
        return f"{self.path} (the default owner key; ${ENV_HOME}/{DEFAULT_KEY_NAME})"


def default_owner_key_path() -> Path:
    return enclaveq_home() / DEFAULT_KEY_NAME


def find_owner_key(flag: Path | str | None) -> OwnerKeySource:
    """The key file to use: the flag, else ``$ENCLAVEQ_OWNER_KEY``, else the default file."""
    if flag is not None and str(flag):
        return OwnerKeySource(Path(flag), FLAG)
    env = os.environ.get(ENV_OWNER_KEY)
    if env:
        return OwnerKeySource(Path(env).expanduser(), ENV)
    return OwnerKeySource(default_owner_key_path(), DEFAULT)


_SIGNED_BY = {"model": "the key that uploaded the model", "pipeline": "the key that created the pipeline"}


def load_owner_key(source: OwnerKeySource, *, create: bool = False,
                   owns: Literal["model", "pipeline"] = "model") -> tuple[Ed25519PrivateKey, bool]:
    """The private key at ``source`` and whether this call created it.

    ``create`` lets a missing *default* key file be created (``model upload``); a missing file
    named by the flag or the variable is always an error, as is a missing default without
    ``create`` (``model delete``). ``owns`` (a model or a pipeline) is what the key signs for:
    the error for a missing default names the key the user should point to."""
    if not os.path.lexists(source.path):
        if create and source.origin == DEFAULT:
            key = _create_default(source.path)
            if key is not None:
                return key, True
        elif source.origin == DEFAULT:
            raise OwnerKeyError(
                f"no owner key: looked for the default key file {source.path}; pass --owner-key FILE or set "
                f"{ENV_OWNER_KEY} to {_SIGNED_BY[owns]}")
        else:
            raise OwnerKeyError(f"no owner key file at {source.describe()}")
    _refuse_open_permissions(source.path)
    try:
        return load_signing_key(source.path), False
    except KeyFileError as exc:
        raise OwnerKeyError(f"{exc} ({source.describe()})") from None


def _refuse_open_permissions(path: Path) -> None:
    if os.name != "posix":
        return
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        raise OwnerKeyError(f"cannot read owner key file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise OwnerKeyError(f"owner key file {path} is accessible by group or others (mode {mode:04o}); "
                            f"a private key must be yours alone: chmod 600 {path}")


def _make_home(home: Path) -> None:
    try:
        home.parent.mkdir(parents=True, exist_ok=True)
        home.mkdir(mode=0o700)
    except FileExistsError:
        return  # already there (made by the user, or by a concurrent first upload): leave its mode alone
    except OSError as exc:
        raise OwnerKeyError(f"cannot create {home} for the default owner key: {exc.strerror}") from None
    os.chmod(home, 0o700)  # exactly 0700, whatever the umask


def _create_default(path: Path) -> Ed25519PrivateKey | None:
    """Create the default key file; ``None`` when a concurrent first use created it meanwhile."""
    _make_home(path.parent)
    key = generate_signing_key()
    scratch = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    try:
        save_signing_key(key, scratch)  # O_CREAT|O_EXCL, 0600 from the start, fsynced
    except KeyFileError as exc:
        raise OwnerKeyError(f"cannot create the default owner key {path}: {exc}") from None
    try:
        os.link(scratch, path)  # atomic, and refuses an existing name: never a half-written key
    except FileExistsError:
        return None
    except OSError:
        # No hard links on this file system: create the file itself, still O_EXCL and 0600.
        try:
            save_signing_key(key, path)
        except KeyFileError as exc:
            if os.path.lexists(path):
                return None
            raise OwnerKeyError(f"cannot create the default owner key {path}: {exc}") from None
    finally:
        scratch.unlink(missing_ok=True)
    return key
