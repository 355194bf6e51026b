"""Attested pool public keys, per epoch, remembered across a recipient's restarts (issue 11).

A recipient checks every result against the pool public key of the epoch the result names
(``protocol.results.open_result``). Attesting the pool gives the key of the pool's *current*
epoch only. When the pool rotates while a recipient is not running, the results sealed before
the rotation still wait in its inbox, under the older epoch; a recipient that had forgotten that
epoch's key would have to refuse them as ``unknown_epoch`` -- results lost for a routine
rotation. So a subscriber remembers every epoch key it verified, here, and trusts it again after
a restart.

Cache a verified fact only with everything it was verified against. A key was vouched for by
evidence that satisfied *one* policy, for *one* pool name; so entries are keyed by the SHA-256 of
both (the pool name and the policy's canonical TOML, ``attestation.policy.policy_to_toml``). A
subscriber with another policy -- stricter, or another pool's -- never sees keys it did not verify
itself. Pool public keys are not secret, but the file is an integrity anchor, like the policy
file next to it: whoever can write it could make forged results authenticate. It lives in
``$ENCLAVEQ_HOME`` (mode 0600 in a 0700 directory) on the recipient's own machine, which our
threat model trusts (docs/security.md); the broker never touches it.

The file, ``$ENCLAVEQ_HOME/pool-keys.json`` by default:

* is written only when a subscriber verifies a key it did not know (once per rotation), atomically
  and merged with what other processes wrote, under the directory lock (``_state_files``);
* is bounded: the :data:`MAX_EPOCHS` newest epochs per (pool, policy), the :data:`MAX_ENTRIES`
  most recently verified (pool, policy) pairs;
* holds one key per epoch: a *different* key verified for an epoch already remembered means the
  pool was deleted and created again under its name, so that entry's older history belongs to a
  pool that no longer exists and is dropped (with a warning);
* an unreadable or corrupt file is set aside as ``pool-keys.json.corrupt`` with a warning:
  results of forgotten epochs are then refused as before, never accepted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from attestation.policy import Policy, policy_to_toml

from ._state_files import PROCESS_LOCK, directory_lock, read_state, write_atomically
from .epochs import enclaveq_home

log = logging.getLogger("enclaveq.recipient")

FILE_NAME = "pool-keys.json"
FORMAT_VERSION = 1
MAX_EPOCHS = 64
MAX_ENTRIES = 256
# 256 entries of 64 keys take ~2.5 MB at most; anything far larger was not written by us.
MAX_FILE_BYTES = 8 * 1024 * 1024
KEY_BYTES = 32

# What a subscriber takes as ``pool_keys``: None for the default file, False for memory only, or a path.
PoolKeyState = str | os.PathLike[str] | Literal[False] | None

_Entries = dict[str, dict[str, Any]]  # scope -> {"pool": str, "verified_ms": int, "epochs": {int: bytes}}


def default_pool_keys_file() -> Path:
    return enclaveq_home() / FILE_NAME


def scope_of(pool: str, policy: Policy) -> str:
    """What a remembered key was verified against: the pool name and the whole policy."""
    digest = hashlib.sha256()
    for part in (b"enclaveq pool keys v1", pool.encode(), policy_to_toml(policy).encode()):
        digest.update(len(part).to_bytes(4, "big") + part)
    return digest.hexdigest()


class PoolKeys:
    """The pool public keys one subscriber verified, per epoch, for one (pool, policy) scope;
    kept in ``path`` too (None: this subscriber only)."""

    def __init__(self, pool: str, policy: Policy, path: str | os.PathLike[str] | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.pool = pool
        self.scope = scope_of(pool, policy)
        self.path = Path(path).expanduser() if path is not None else None
        self._clock = clock

    def remembered(self) -> dict[int, bytes]:
        """Every epoch key remembered in the file for this scope ({} without a file)."""
        if self.path is None:
            return {}
        entry = self._load().get(self.scope)
        return dict(entry["epochs"]) if entry is not None else {}

    def remember(self, epoch: int, key: bytes) -> None:
        """``key`` was verified (by attestation under this policy) as the pool's key of ``epoch``.
        Never raises: failing to remember must not fail the subscriber that learnt it."""
        if self.path is None:
            return
        if self.remembered().get(epoch) == key:
            return  # the common case: a restart attests an epoch it already knows
        try:
            self._update(lambda entries: self._put(entries, epoch, key))
        except OSError as exc:
            log.warning("could not remember the key of epoch %d of pool %r in %s (%s); after a restart, results "
                        "of that epoch will be refused once the pool has rotated", epoch, self.pool, self.path,
                        exc.strerror or exc)

    def _put(self, entries: _Entries, epoch: int, key: bytes) -> None:
        entry = entries.get(self.scope)
        epochs: dict[int, bytes] = dict(entry["epochs"]) if entry is not None else {}
        if epochs.get(epoch, key) != key:
            log.warning("pool %r has another key at epoch %d than the one remembered: it was created again under its "
                        "name; the keys of its earlier life are forgotten", self.pool, epoch)
            epochs = {}
        epochs[epoch] = key
        newest = sorted(epochs)[-MAX_EPOCHS:]
        entries[self.scope] = {"pool": self.pool, "verified_ms": int(self._clock() * 1000),
                               "epochs": {e: epochs[e] for e in newest}}

    # -- the file --------------------------------------------------------------------------
    def _load(self) -> _Entries:
        assert self.path is not None
        return read_state(self.path, _parse, {}, max_bytes=MAX_FILE_BYTES, what="the remembered pool keys",
                          consequence="results of epochs this subscriber has not attested are refused", log=log)

    def _update(self, change: Callable[[_Entries], None]) -> None:
        assert self.path is not None
        with PROCESS_LOCK, directory_lock(self.path.parent):
            entries = self._load()
            change(entries)
            if len(entries) > MAX_ENTRIES:  # keep the most recently verified scopes
                kept = sorted(entries.items(), key=lambda item: item[1]["verified_ms"], reverse=True)
                entries = dict(kept[:MAX_ENTRIES])
            write_atomically(self.path, _dump(entries))


def pool_keys_for(pool_keys: PoolKeyState, broker_url: str, pool: str, policy: Policy) -> PoolKeys:
    """The keys a subscriber keeps: ``False`` memory only; a path that file; ``None`` the default
    file -- except on ``memory://`` brokers, whose pools die with the process."""
    if pool_keys is False or (pool_keys is None and broker_url.lower().startswith("memory://")):
        return PoolKeys(pool, policy, None)
    if pool_keys is None:
        return PoolKeys(pool, policy, default_pool_keys_file())
    if isinstance(pool_keys, (str, os.PathLike)):
        return PoolKeys(pool, policy, pool_keys)
    raise TypeError("pool_keys must be a path, None (the default file) or False (remember nothing on disk)")


def _parse(data: bytes) -> _Entries:
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION or not isinstance(doc.get("scopes"), dict):
        raise ValueError(f"not a version-{FORMAT_VERSION} pool keys file")
    entries: _Entries = {}
    for scope, entry in doc["scopes"].items():
        try:
            pool, verified, raw = entry["pool"], entry["verified_ms"], entry["epochs"]
            if not (isinstance(pool, str) and type(verified) is int and isinstance(raw, dict) and len(raw) <= MAX_EPOCHS):
                raise TypeError
            epochs = {int(epoch): bytes.fromhex(key) for epoch, key in raw.items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"bad entry {str(scope)[:16]!r}") from None
        if any(epoch < 1 or len(key) != KEY_BYTES for epoch, key in epochs.items()):
            raise ValueError(f"bad key in entry {str(scope)[:16]!r}")
        entries[scope] = {"pool": pool, "verified_ms": verified, "epochs": epochs}
    return entries


def _dump(entries: _Entries) -> bytes:
    scopes = {scope: {"pool": entry["pool"], "verified_ms": entry["verified_ms"],
                      "epochs": {str(epoch): key.hex() for epoch, key in sorted(entry["epochs"].items())}}
              for scope, entry in sorted(entries.items())}
    return json.dumps({"version": FORMAT_VERSION, "scopes": scopes}, indent=1).encode() + b"\n"


__all__ = ["PoolKeyState", "PoolKeys", "default_pool_keys_file", "pool_keys_for", "scope_of"]
