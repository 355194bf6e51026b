"""Per-message state the worker keeps about producers' sessions, each piece bounded.

* :class:`SessionCache`: session secrets opened from sealed sessions, so one HPKE open serves a
  whole session. A secret opens its session's jobs as well as the epoch key that unsealed it,
  so erasing an epoch erases its sessions too (:meth:`SessionCache.forget_epochs`).
* :class:`SeenJobs`: jobs already answered, so a replay or a redelivery after a lost ack is
  never answered twice.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from protocol import crypto
from protocol.envelope import RequestHeader

from .keyring import Keyring

MAX_CACHED_SESSIONS = 10_000


class SessionCache:
    def __init__(self, pool: str, max_sessions: int = MAX_CACHED_SESSIONS) -> None:
        self._pool = pool
        self._max = max_sessions
        # Keyed by everything the secret was opened from: a different sealed session under the
        # same id is opened (and checked) afresh.
        self._secrets: OrderedDict[tuple[bytes, int, bytes], crypto.SessionSecret] = OrderedDict()

    def secret_for(self, header: RequestHeader, keyring: Keyring) -> crypto.SessionSecret:
        """The session secret of ``header``'s session, opened with ``keyring``'s key for its epoch
        when not cached; raises the keyring's EpochAhead or
        EpochRetired, or DecryptionFailed when the sealed session does not open."""
        cache_key = (header.session_id, header.epoch, header.sealed_session)
        secret = self._secrets.get(cache_key)
        if secret is not None:
            self._secrets.move_to_end(cache_key)
            return secret
        secret = crypto.SessionSecret(crypto.open_session_key(
            header.sealed_session, keyring.private_for(header.epoch), pool=self._pool,
            epoch=header.epoch, session_id=header.session_id))
        self._secrets[cache_key] = secret
        if len(self._secrets) > self._max:
            self._secrets.popitem(last=False)
        return secret

    def forget_epochs(self, epochs: Iterable[int]) -> None:
        gone = set(epochs)
        self._secrets = OrderedDict((k, v) for k, v in self._secrets.items() if k[1] not in gone)

    def epochs(self) -> set[int]:
        """The epochs of the cached sessions (tests check erasure with it)."""
        return {epoch for _, epoch, _ in self._secrets}


class SeenJobs:
    """Jobs already answered, kept until their deadline: replays inside the deadline are dropped,
    replays after it are refused as expired, so the set stays bounded."""

    def __init__(self) -> None:
        self._seen: dict[tuple[bytes, str], int] = {}

    def contains(self, key: tuple[bytes, str]) -> bool:
        return key in self._seen

    def add(self, key: tuple[bytes, str], deadline_ms: int, now_ms: int) -> None:
        self._seen[key] = deadline_ms
        if len(self._seen) % 4096 == 0:
            self._seen = {k: d for k, d in self._seen.items() if d >= now_ms}
