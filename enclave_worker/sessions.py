"""Producers' sessions as this worker opened them: each session's secret and the producer key
its proof vouches for, cached together, bounded, and erased with the epoch they came from.

A session is identified by *everything it was opened from*: session id, epoch and the sealed
session key itself. Anyone can seal a session key of her own under someone else's session id
(the pool key is public), so the session id alone names nothing. The producer key proved for a
session is therefore stored *inside* the opened session it was verified against
(:class:`OpenedSession`), never beside it under a shorter key: a proof copied from a clear header
into another sealed session is verified afresh against that session, and fails (P7).

A secret opens its session's jobs as well as the epoch key that unsealed it, and a verified
producer key says something only about that epoch's session, so erasing an epoch erases both
(:meth:`SessionCache.forget_epochs`, called by the keyring when it erases keys).

The replay set lives in :mod:`enclave_worker.replay_guard`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from protocol import bodies, crypto
from protocol.envelope import RequestHeader
from protocol.errors import MalformedMessage, SignatureInvalid
from protocol.ownership import ProducerProof

from .errors import JobRejected
from .keyring import Keyring

MAX_CACHED_SESSIONS = 10_000

SessionKey = tuple[bytes, int, bytes]  # (session id, epoch, sealed session)


class OpenedSession:
    """One sealed session this worker opened: its secret, and the producer key its proof was
    verified to vouch for -- verified against exactly this session, once, on first need."""

    __slots__ = ("secret", "epoch", "_pool", "_session_id", "_sealed", "_proof", "_producer_key")

    def __init__(self, pool: str, header: RequestHeader, secret: crypto.SessionSecret) -> None:
        self.secret = secret
        self.epoch = header.epoch
        self._pool = pool
        self._session_id = header.session_id
        self._sealed = header.sealed_session
        # The last proof looked at and what it proved (None: it did not verify). Only the holder
        # of the session key can put a proof into a request that opens, so a session has one
        # proof in practice; a different one is simply verified again.
        self._proof: bytes | None = None
        self._producer_key: bytes | None = None

    def __repr__(self) -> str:  # never the secret
        return f"OpenedSession(epoch={self.epoch}, session_id={self._session_id.hex()})"

    def producer_key(self, proof: bytes | None) -> bytes | None:
        """The producer key ``proof`` proves for this session; None when there is no proof.
        Raises ``bad_signature`` when the proof was not made for this exact sealed session."""
        if proof is None:
            return None
        if proof != self._proof:
            key: bytes | None
            try:
                parsed = ProducerProof.from_bytes(proof)
                parsed.verify(pool=self._pool, epoch=self.epoch, session_id=self._session_id,
                              sealed_session=self._sealed)
                key = parsed.producer_key
            except (SignatureInvalid, MalformedMessage):
                key = None
            self._proof, self._producer_key = proof, key
        if self._producer_key is None:
            raise JobRejected("the producer key proof of this session does not verify",
                              bodies.ErrorCode.BAD_SIGNATURE)
        return self._producer_key


class SessionCache:
    def __init__(self, pool: str, max_sessions: int = MAX_CACHED_SESSIONS) -> None:
        self._pool = pool
        self._max = max_sessions
        self._sessions: OrderedDict[SessionKey, OpenedSession] = OrderedDict()

    def open(self, header: RequestHeader, keyring: Keyring) -> OpenedSession:
        """``header``'s session, opened with ``keyring``'s key for its epoch when not cached;
        raises the keyring's EpochAhead or EpochRetired, or DecryptionFailed when the sealed
        session does not open."""
        cache_key = (header.session_id, header.epoch, header.sealed_session)
        session = self._sessions.get(cache_key)
        if session is not None:
            self._sessions.move_to_end(cache_key)
            return session
        secret = crypto.SessionSecret(crypto.open_session_key(
            header.sealed_session, keyring.private_for(header.epoch), pool=self._pool,
            epoch=header.epoch, session_id=header.session_id))
        session = self._sessions[cache_key] = OpenedSession(self._pool, header, secret)
        if len(self._sessions) > self._max:
            self._sessions.popitem(last=False)
        return session

    def get(self, header: RequestHeader) -> OpenedSession | None:
        """The session ``header`` was opened with, if it is still cached (it always is while its
        request is being handled: nothing is evicted between opening and the handler's check)."""
        return self._sessions.get((header.session_id, header.epoch, header.sealed_session))

    def forget_epochs(self, epochs: Iterable[int]) -> None:
        gone = set(epochs)
        self._sessions = OrderedDict((k, v) for k, v in self._sessions.items() if k[1] not in gone)

    def epochs(self) -> set[int]:
        """The epochs of the cached sessions and of the producer keys verified for them (tests
        check erasure with it)."""
        return {epoch for _, epoch, _ in self._sessions}

    def __len__(self) -> int:
        return len(self._sessions)
