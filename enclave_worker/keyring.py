"""The worker's pool keys by epoch: which epochs it can open, rotation, and erasure (P6).

A pool has one *current* epoch, whose public key every statement attests and producers seal
new sessions to, and possibly a few *retiring* epochs: rotated away, still opening jobs that
were sealed to them, until their retirement time. When that passes, :meth:`Keyring.erase_retired`
drops the private key from this object, from the sealed state on disk (rewritten without it)
and from the session-secret cache the worker keeps (a session secret opens that session's jobs
just as well as the epoch key that unsealed it, so it must go too).

What "erased" can mean in Python: every reference the worker holds is dropped and the sealed
file no longer contains the key. The bytes of an immutable ``bytes`` object cannot be
overwritten in place; the X25519 key object itself lives in OpenSSL, which clears it on free.
A host that snapshots the worker's memory *during* the grace period has the key anyway -- no
software erasure helps against that; the guarantee is about what remains after it.

Rotation messages (:class:`protocol.handshake.EpochAnnounce`) carry the new key HPKE-sealed to
the previous epoch's pool key: exactly the set of workers that were admitted by mutual
attestation holds that key, so exactly they can open it. The announcer's evidence, checked by
each receiver against its join policy, binds the statement (new public key, epoch) and, through
the statement nonce, the sealed blob and the retirement time.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol import crypto
from protocol.codec import pack, unpack
from protocol.errors import MalformedMessage
from protocol.handshake import EpochAnnounce, Statement, rotation_info, rotation_nonce

from .sealed_state import PoolKeys, RetiringKey, SealedState

log = logging.getLogger("enclaveq.worker")


class EpochRetired(Exception):
    """The request is sealed to an epoch this worker no longer (or never) held: it is older than
    every key it has. The producer must re-attest and seal again."""


class EpochAhead(Exception):
    """The request is sealed to an epoch newer than this worker's: it missed a rotation."""


class Keyring:
    """The pool keys this worker holds. Empty until :meth:`adopt` (a worker learns its keys by
    founding, joining or unsealing them at start); every change sets :attr:`changed`."""

    def __init__(self, state: SealedState, now_ms: Callable[[], int],
                 on_erase: Callable[[set[int]], None] = lambda epochs: None) -> None:
        self._state = state
        self._now_ms = now_ms
        # Told which epochs disappeared, so the owner drops what it derived from them (session secrets).
        self._on_erase = on_erase
        self._private: dict[int, X25519PrivateKey] = {}
        self._keys: PoolKeys | None = None
        self.public_key = b""
        self.identity_public_key = b""
        # Set on every change of keys; the eraser waits on it for the next retirement time.
        self.changed = asyncio.Event()

    @property
    def keys(self) -> PoolKeys:
        if self._keys is None:
            raise RuntimeError("the worker holds no pool keys yet")
        return self._keys

    @property
    def has_keys(self) -> bool:
        return self._keys is not None

    def adopt(self, keys: PoolKeys) -> None:
        """Take ``keys`` (founded, handed over by a member, or unsealed), seal them, and drop
        whatever already retired."""
        self._state.save_pool_keys(keys)
        self._load(keys)
        self.erase_retired()

    def _load(self, keys: PoolKeys) -> None:
        before = set(self._private)
        self._keys = keys
        self._private = {keys.epoch: crypto.load_private_key(keys.pool_private_key)}
        for old in keys.previous:
            self._private[old.epoch] = crypto.load_private_key(old.private_key)
        self.public_key = crypto.public_bytes(self._private[keys.epoch])
        self.identity_public_key = crypto.public_bytes(crypto.load_private_key(keys.identity_private_key))
        self.changed.set()
        if gone := before - set(self._private):
            self._on_erase(gone)

    @property
    def epoch(self) -> int:
        return self.keys.epoch

    @property
    def current_private(self) -> X25519PrivateKey:
        return self._private[self.keys.epoch]

    def epochs(self) -> tuple[int, ...]:
        return tuple(sorted(self._private))

    def private_for(self, epoch: int) -> X25519PrivateKey:
        key = self._private.get(epoch)
        if key is not None:
            return key
        if epoch > self.keys.epoch:
            raise EpochAhead(epoch)
        raise EpochRetired(epoch)

    # -- rotation -----------------------------------------------------------------------------
    def install(self, epoch: int, private_key: bytes, retire_at_ms: int) -> None:
        """Make ``epoch`` current; the previous current key retires at ``retire_at_ms``."""
        if epoch != self.keys.epoch + 1:
            raise ValueError(f"epoch {epoch} does not follow {self.keys.epoch}")
        retiring = RetiringKey(self.keys.epoch, self.keys.pool_private_key, retire_at_ms)
        keys = replace(self.keys, epoch=epoch, pool_private_key=private_key, created_ms=self._now_ms(),
                       previous=self.keys.previous + (retiring,))
        self._state.save_pool_keys(keys)  # sealed first: a crash now still knows the new key
        self._load(keys)
        self.erase_retired()

    def next_retirement_ms(self) -> int | None:
        return min((k.retire_at_ms for k in self.keys.previous), default=None)

    def erase_retired(self) -> list[int]:
        """Drop every previous epoch past its retirement, from memory and sealed state."""
        keys = self.keys.without_retired(self._now_ms())
        if keys is self.keys:
            return []
        gone = [k.epoch for k in self.keys.previous if k not in keys.previous]
        self._state.save_pool_keys(keys)
        self._load(keys)
        log.info("erased the pool key of epoch(s) %s: jobs sealed to them can no longer be opened", gone)
        return gone

    def retiring_for_join(self) -> list[list[object]]:
        return [[k.epoch, k.private_key, k.retire_at_ms] for k in self.keys.previous]

    # -- announcements --------------------------------------------------------------------------
    def seal_next(self, new_private: bytes, pool: str, retire_at_ms: int) -> tuple[bytes, bytes]:
        """(sealed new key, statement nonce) for announcing epoch N+1 to the holders of epoch N."""
        epoch = self.keys.epoch + 1
        sealed = crypto.hpke_seal(pack({"epoch": epoch, "pool_private_key": new_private}), self.public_key,
                                  rotation_info(pool, epoch, self.keys.epoch, retire_at_ms))
        return sealed, rotation_nonce(pool, epoch, self.keys.epoch, retire_at_ms, sealed)

    def open_announce(self, announce: EpochAnnounce, pool: str) -> bytes:
        """The new private key in a verified-evidence announcement; raises MalformedMessage or
        DecryptionFailed if anything disagrees. The caller has checked the evidence."""
        st: Statement = announce.statement
        if st.pool != pool or st.suite != crypto.SUITE_ID:
            raise MalformedMessage("epoch announcement for another pool or suite")
        if st.nonce != rotation_nonce(pool, st.epoch, announce.previous_epoch, announce.retire_at_ms,
                                      announce.sealed_key):
            raise MalformedMessage("epoch announcement: the evidence does not vouch for this sealed key")
        raw = crypto.hpke_open(announce.sealed_key, self.private_for(announce.previous_epoch),
                               rotation_info(pool, st.epoch, announce.previous_epoch, announce.retire_at_ms))
        m = unpack(raw, max_bytes=1024, what="rotated pool key")
        private = m.get("pool_private_key") if isinstance(m, dict) else None
        if (not isinstance(m, dict) or type(m.get("epoch")) is not int or m.get("epoch") != st.epoch
                or crypto.public_bytes(parse_private_key(private, "epoch announcement")) != st.pool_public_key):
            raise MalformedMessage("epoch announcement: the sealed key is not the key the statement attests")
        assert isinstance(private, bytes)  # parse_private_key checked it
        return private


def parse_private_key(raw: object, what: str) -> X25519PrivateKey:
    """An X25519 private key from bytes someone else sent (sealed to us, but by whom is another
    question): anything but 32 bytes is a MalformedMessage, never a ValueError."""
    if not isinstance(raw, bytes) or len(raw) != crypto.PUBLIC_KEY_BYTES:
        raise MalformedMessage(f"{what}: a private key must be {crypto.PUBLIC_KEY_BYTES} bytes")
    try:
        return crypto.load_private_key(raw)
    except ValueError:
        raise MalformedMessage(f"{what}: not an X25519 private key") from None
