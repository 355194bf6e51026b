"""Recipients: read a pipeline's results, sealed so that only they open them (issue 11).

    async with AsyncResultSubscriber(broker_url, "my-pool", "policy.toml", pipeline=pipeline_id,
                                     key="recipient.key") as subscriber:
        async for result in subscriber:          # protocol.results.PipelineResult
            print(result.event_id, result.outputs)

How a recipient trusts a result (docs/pipelines.md, "the recipient model"): it attests the pool
once with its *own* policy (an :class:`AsyncClient` underneath), which gives it the pool's
public key of the current epoch, vouched for by the evidence. Each result carries an origin tag
that only a holder of that epoch's private key -- an attested pool member -- could compute for
this recipient; ``protocol.results.open_result`` checks it before decrypting anything. A result
of a newer epoch than any attested (the pool rotated) makes the subscriber attest again, once
per epoch (and at most every :data:`REATTEST_INTERVAL_SECONDS`); anything still unknown is
refused. Results of an epoch older than the first attestation (sealed before a rotation that
happened while the subscriber was not running) are checked against the keys it verified in an
earlier run, remembered per pool and policy in ``$ENCLAVEQ_HOME/pool-keys.json``
(``producer_sdk.pool_keys``; ``pool_keys=`` chooses another file, or ``False`` for none);
a result of an epoch nobody verified is refused.

What the subscriber does with each delivery of its inbox (``<pipeline id>.<first 32 hex of the
recipient public key>``, declared with the pipeline, so results wait there while nobody reads):

- a result that opens, names this pipeline and an event id not seen before is yielded; it is
  acknowledged when the caller asks for the next one (or leaves ``async with`` without an
  error): a result whose handling failed is delivered again;
- a duplicate (an event id among the last ``max_remembered``) is acknowledged and dropped;
- anything refused (not for this key, forged or altered, another pool, an unknown epoch, another
  pipeline sharing the sink topic, not a result at all) is acknowledged, counted by reason in
  ``refusals`` and logged at warning with the reason code only.

``ResultSubscriber`` is the synchronous twin. Recipient key files (X25519, PKCS#8 PEM, mode
0600) are made by ``enclaveq keys generate --kind recipient`` or :func:`save_recipient_key`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from attestation.claims import Claims
from attestation.policy import Policy
from broker_adapters import Delivery, Subscription
from broker_adapters.errors import BrokerError, BrokerUnavailable, QueueNotFound
from protocol import bodies, crypto
from protocol.errors import KeyFileError, MalformedMessage, OversizedMessage, ProtocolError
from protocol.results import (
    NotARecipient, PipelineResult, ResultForged, UnknownEpoch, WrongPool, generate_recipient_key, open_result,
    peek_result_header,
)

from .async_client import AsyncClient, CollateralLike, KeyLike
from .client import BackgroundLoop
from .core import inbox_name
from .epochs import EpochState
from .pool_keys import PoolKeyState, pool_keys_for
from .errors import BrokerUnreachable, ClientClosed, EnclaveqError, InboxNotFound, JobTimeout, UnknownPipeline

log = logging.getLogger("enclaveq.recipient")

__all__ = [
    "AsyncResultSubscriber", "RecipientKeyLike", "ResultSubscriber", "generate_recipient_key", "load_recipient_key",
    "recipient_public_key", "save_recipient_key",
]

# A recipient's X25519 private key, or the path of a key file (`enclaveq keys generate --kind recipient`).
RecipientKeyLike = X25519PrivateKey | str | os.PathLike[str]

MAX_KEY_FILE_BYTES = 64 * 1024
DEFAULT_MAX_REMEMBERED = 100_000
# A result naming a newer epoch re-attests the pool; the epoch is clear text anyone on the broker
# can write, so a flood of forged headers must not turn into a flood of attestations.
REATTEST_INTERVAL_SECONDS = 10.0
MAX_EPOCHS_TRIED = 1024
# Refusals logged per reason before only every LOG_EVERY-th is (a flood of forgeries stays a few lines).
LOG_FIRST = 10
LOG_EVERY = 1000

_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_END = object()

# The refusal reasons, as counted in ``refusals`` and logged.
MALFORMED = "malformed"
NOT_RECIPIENT = "not_recipient"
FORGED = "forged"
WRONG_POOL = "wrong_pool"
UNKNOWN_EPOCH = "unknown_epoch"
OTHER_PIPELINE = "other_pipeline"


# --------------------------------------------------------------------------- key files


def save_recipient_key(key: X25519PrivateKey, path: str | os.PathLike[str]) -> None:
    """Write a recipient private key as unencrypted PKCS#8 PEM to a new file readable by its
    owner only (0600). Never overwrites: a lost recipient key cannot read the results sealed to it."""
    if not isinstance(key, X25519PrivateKey):
        raise TypeError("expected an X25519 private key")
    path = Path(path)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key file") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)  # whatever the umask
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise KeyFileError(f"no key file at {path}") from None
    except IsADirectoryError:
        raise KeyFileError(f"{path} is a directory, not a key file") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path} is too large to be a key file")
    return data


def _private(path: Path, data: bytes) -> Any:
    """The private key in ``data`` (any kind), or None; never chains the parser's message (it
    could quote the file)."""
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"{path} is an encrypted key; enclaveq key files are unencrypted PEM, protected by "
                           f"their 0600 file mode") from None
    except (ValueError, UnsupportedAlgorithm):
        return None


def load_recipient_key(path: str | os.PathLike[str]) -> X25519PrivateKey:
    """Read a recipient private key file (X25519 PKCS#8 PEM, as ``save_recipient_key`` writes)."""
    path = Path(path)
    key = _private(path, _read(path))
    if not isinstance(key, X25519PrivateKey):
        raise KeyFileError(f"{path} is not a PEM X25519 (recipient) private key")
    return key


def recipient_public_key(key: X25519PrivateKey | X25519PublicKey | str | os.PathLike[str]) -> bytes:
    """The raw 32-byte recipient public key (what ``access.recipients`` lists, in hex): of a key
    object, of 64 hex characters, or of a PEM X25519 private or public key file."""
    if isinstance(key, (X25519PrivateKey, X25519PublicKey)):
        return crypto.public_bytes(key)
    if isinstance(key, str) and _HEX_KEY.fullmatch(key.strip()):
        raw = bytes.fromhex(key.strip())
        try:
            X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
        except ValueError:
            raise KeyFileError("that recipient key is a small-order point; nobody could open what is sealed to it") from None
        return raw
    path = Path(key)
    if isinstance(key, str) and not path.exists():
        raise KeyFileError("expected 64 hex characters or the path of a PEM X25519 key file; got neither")
    data = _read(path)
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        public = None
    if isinstance(public, X25519PublicKey):
        return crypto.public_bytes(public)
    private = _private(path, data)
    if isinstance(private, X25519PrivateKey):
        return crypto.public_bytes(private)
    raise KeyFileError(f"{path} is not a PEM X25519 (recipient) public or private key")


def _recipient_key(key: RecipientKeyLike) -> X25519PrivateKey:
    if isinstance(key, X25519PrivateKey):
        return key
    if isinstance(key, (str, os.PathLike)):
        return load_recipient_key(key)
    raise TypeError("key must be an X25519 private key or the path of a key file from "
                    "`enclaveq keys generate --kind recipient`")


# --------------------------------------------------------------------------- subscriber


class AsyncResultSubscriber:
    """Read the results of one pipeline sealed to one recipient key (``ResultSubscriber``: the
    sync twin). Iterate with ``async for``, or call ``receive(timeout)``.

    ``policy`` is what this recipient trusts the pool by (it attests the pool itself; results
    authenticate as coming from the attested pool key). ``key`` is the recipient's X25519 private
    key or key file. ``timeout`` bounds the requests to the pool (attestation, the pipeline list);
    ``prefetch`` how many deliveries wait unacknowledged; ``max_remembered`` how many event ids
    are remembered to drop duplicates (the oldest forgotten first). The other arguments are
    :class:`AsyncClient`'s. ``pool_keys`` is where the pool keys of verified epochs are remembered
    across restarts (None: ``$ENCLAVEQ_HOME/pool-keys.json``; a path; False: not on disk); with
    ``trust`` given (other trust roots than the built-in ones), nothing is remembered on disk.
    """

    def __init__(self, broker_url: str, pool: str, policy: Policy | str | os.PathLike[str], pipeline: str,
                 key: RecipientKeyLike, *, timeout: float = 120.0, attest_timeout: float = 10.0, prefetch: int = 256,
                 max_remembered: int = DEFAULT_MAX_REMEMBERED, producer_key: KeyLike | None = None,
                 name: str | None = None, trust: Any = None, collateral: CollateralLike | None = None,
                 epoch_state: EpochState = None, pool_keys: PoolKeyState = None,
                 clock: Callable[[], float] = time.time, rng: crypto.Random = os.urandom) -> None:
        if prefetch < 1 or max_remembered < 1:
            raise ValueError("prefetch and max_remembered must be at least 1")
        self.pipeline = pipeline
        self.pool = pool
        self._key = _recipient_key(key)
        self.public_key = crypto.public_bytes(self._key)
        self.inbox = inbox_name(pool, pipeline, self.public_key)
        self.prefetch = prefetch
        self.max_remembered = max_remembered
        self._client = AsyncClient(broker_url, pool, policy, name=name, timeout=timeout,
                                   attest_timeout=attest_timeout, clock=clock, rng=rng, trust=trust,
                                   collateral=collateral, producer_key=producer_key, epoch_state=epoch_state)
        self.info: bodies.PipelineInfo | None = None
        # The pool public key of each attested epoch: what results are checked against. Keys
        # verified by an earlier run under the same pool and policy come from ``_pool_keys``
        # (a key verified against other trust roots than the built-in ones is not kept on disk).
        self._pool_keys = pool_keys_for(False if trust is not None else pool_keys, broker_url, pool,
                                        self._client.policy)
        self._epoch_keys: dict[int, bytes] = {}
        self._epochs_tried: OrderedDict[int, None] = OrderedDict()
        self._last_reattest = float("-inf")
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._sub: Subscription | None = None
        # The delivery of the result returned last, and its handler's wait: acked once handled.
        self._last: tuple[Delivery, asyncio.Future[None]] | None = None
        self._closed = False
        self.received = 0
        self.duplicates = 0
        self.refusals: Counter[str] = Counter()

    @property
    def refused(self) -> int:
        """How many deliveries were refused (``refusals`` has them by reason)."""
        return sum(self.refusals.values())

    @property
    def client(self) -> AsyncClient:
        return self._client

    @property
    def claims(self) -> Claims | None:
        return self._client.claims

    async def __aenter__(self) -> AsyncResultSubscriber:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # Leaving with an error: the result being handled is delivered again (not acknowledged).
        await self.close(handled=exc_type is None)

    def __aiter__(self) -> AsyncResultSubscriber:
        return self

    async def __anext__(self) -> PipelineResult:
        try:
            return await self.receive()
        except ClientClosed:
            raise StopAsyncIteration from None

    async def connect(self) -> Claims:
        """Attest the pool, check that it holds the pipeline, start consuming the inbox."""
        claims = await self._client.connect()
        try:
            self._epoch_keys.update(self._pool_keys.remembered())
            self._learn_epoch()
            pipelines = await self._client.list_pipelines()
            info = next((p for p in pipelines if p.pipeline_id == self.pipeline), None)
            if info is None:
                raise UnknownPipeline(f"pool {self.pool!r} has no pipeline {self.pipeline[:80]!r}")
            self.info = info
            broker, _ = self._client._connection()
            try:
                self._sub = await broker.consume_inbox(self.inbox, self._on_delivery, prefetch=self.prefetch)
            except QueueNotFound:
                raise InboxNotFound(f"pipeline {self.pipeline} has no inbox for recipient key "
                                    f"{self.public_key.hex()}: the key is not among its recipients (a pipeline "
                                    f"definition lists them in access.recipients)") from None
            except (BrokerUnavailable, BrokerError) as exc:
                raise BrokerUnreachable(f"cannot consume inbox {self.inbox}: {exc}") from None
        except BaseException:
            await self._client.close()
            raise
        return claims

    def _learn_epoch(self) -> None:
        statement = self._client.statement
        if statement is not None:
            # Just attested: authoritative for its epoch, over anything remembered.
            self._epoch_keys[statement.epoch] = statement.pool_public_key
            self._pool_keys.remember(statement.epoch, statement.pool_public_key)

    async def _on_delivery(self, delivery: Delivery) -> None:
        """The broker's handler: hand the delivery to the reader, which acknowledges it once it
        was handled (or refused), and wait until then. Left unsettled (the subscriber closed
        first), the adapter gives it back to the inbox."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((delivery, done))
        await done

    async def receive(self, timeout: float | None = None) -> PipelineResult:
        """The next new result; ``JobTimeout`` if none arrives within ``timeout`` seconds (None:
        wait as long as it takes), ``ClientClosed`` once closed. Calling it acknowledges the
        result it returned last."""
        await self._settle_last()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._closed:
                raise ClientClosed("the subscriber is closed")
            try:
                async with asyncio.timeout_at(deadline):
                    item = await self._queue.get()
            except TimeoutError:
                raise JobTimeout(f"no new result of pipeline {self.pipeline[:12]}... within {timeout:g}s") from None
            if item is _END:
                self._queue.put_nowait(_END)  # for any other reader
                raise ClientClosed("the subscriber is closed")
            delivery, done = item
            try:
                result = await self._accept(delivery.message.body)
            except BaseException:
                if not done.done():
                    done.cancel()  # unsettled: the inbox delivers it again
                raise
            if result is None:
                await _settle(delivery, done)
                continue
            self._last = (delivery, done)
            return result

    async def _settle_last(self) -> None:
        last, self._last = self._last, None
        if last is not None:
            await _settle(*last)

    async def _accept(self, data: bytes) -> PipelineResult | None:
        """The result ``data`` holds if it is new and ours, else None (refused or a duplicate)."""
        try:
            result = await self._open(data)
        except (MalformedMessage, OversizedMessage):
            return self._refuse(MALFORMED)
        except NotARecipient:
            return self._refuse(NOT_RECIPIENT)
        except WrongPool:
            return self._refuse(WRONG_POOL)
        except UnknownEpoch:
            return self._refuse(UNKNOWN_EPOCH)
        except (ResultForged, ProtocolError):
            return self._refuse(FORGED)
        if result.pipeline_id != self.pipeline:
            # Authentic, but another pipeline's (two pipelines with this recipient share the sink topic).
            return self._refuse(OTHER_PIPELINE)
        if result.event_id in self._seen:
            self.duplicates += 1
            return None
        self._seen[result.event_id] = None
        while len(self._seen) > self.max_remembered:
            self._seen.popitem(last=False)
        self.received += 1
        return result

    async def _open(self, data: bytes) -> PipelineResult:
        try:
            return open_result(data, self._key, self._epoch_keys.get, pool=self.pool)
        except UnknownEpoch:
            epoch = peek_result_header(data).epoch
            if not await self._reattest_for(epoch):
                raise
        return open_result(data, self._key, self._epoch_keys.get, pool=self.pool)

    async def _reattest_for(self, epoch: int) -> bool:
        """Attest the pool again for a result of a newer epoch than any attested: once per epoch,
        and at most every REATTEST_INTERVAL_SECONDS. True if the epoch is now known."""
        newest = max(self._epoch_keys, default=0)
        now = time.monotonic()
        if epoch <= newest or epoch in self._epochs_tried or now - self._last_reattest < REATTEST_INTERVAL_SECONDS:
            return False
        self._epochs_tried[epoch] = None
        while len(self._epochs_tried) > MAX_EPOCHS_TRIED:
            self._epochs_tried.popitem(last=False)
        self._last_reattest = now
        try:
            await self._client.attest()
        except EnclaveqError as exc:
            log.warning("pipeline %s: re-attesting pool %r for a result of epoch %d failed: %s", self.pipeline[:12],
                        self.pool, epoch, str(exc).splitlines()[0][:200])
            return False
        self._learn_epoch()
        log.info("pipeline %s: pool %r re-attested at epoch %d", self.pipeline[:12], self.pool,
                 max(self._epoch_keys))
        return epoch in self._epoch_keys

    def _refuse(self, reason: str) -> PipelineResult | None:
        """Count and log a refusal; None, so that ``return self._refuse(...)`` reads as it does."""
        self.refusals[reason] += 1
        count = self.refusals[reason]
        if count <= LOG_FIRST or count % LOG_EVERY == 0:
            log.warning("pipeline %s: a delivery of inbox %s was refused: %s (%d so far)", self.pipeline[:12],
                        self.inbox[:80], reason, count)
        return None

    async def close(self, *, handled: bool = True) -> None:
        """Stop consuming. The last result returned is acknowledged if ``handled``; everything
        not yet returned goes back to the inbox for the next subscriber."""
        if self._closed:
            return
        self._closed = True
        if handled:
            await self._settle_last()
        elif self._last is not None and not self._last[1].done():
            self._last[1].cancel()
        self._queue.put_nowait(_END)
        try:
            if self._sub is not None:
                await self._sub.cancel()
        except BrokerError:
            pass
        finally:
            await self._client.close()


async def _settle(delivery: Delivery, done: asyncio.Future[None]) -> None:
    """Acknowledge a delivery that was handled or refused, then let its handler return."""
    try:
        await delivery.ack()
    except BrokerError as exc:
        # The broker delivers it again; this subscriber drops it as a duplicate (or a refusal).
        log.warning("acknowledging a delivery failed (%s); it may be delivered again", exc)
    finally:
        if not done.done():
            done.set_result(None)


class ResultSubscriber:
    """The synchronous twin of :class:`AsyncResultSubscriber`: connects on construction, same
    arguments; iterate it (``for result in subscriber``) or call ``receive(timeout)``."""

    def __init__(self, broker_url: str, pool: str, policy: Policy | str | os.PathLike[str], pipeline: str,
                 key: RecipientKeyLike, *, timeout: float = 120.0, attest_timeout: float = 10.0, prefetch: int = 256,
                 max_remembered: int = DEFAULT_MAX_REMEMBERED, producer_key: KeyLike | None = None,
                 name: str | None = None, trust: Any = None, collateral: CollateralLike | None = None,
                 epoch_state: EpochState = None, pool_keys: PoolKeyState = None,
                 clock: Callable[[], float] = time.time, rng: crypto.Random = os.urandom) -> None:
        self._loop = BackgroundLoop("enclaveq-subscriber")
        try:
            self._async = self._loop.call(self._make(
                broker_url, pool, policy, pipeline, key, timeout=timeout, attest_timeout=attest_timeout,
                prefetch=prefetch, max_remembered=max_remembered, producer_key=producer_key, name=name, trust=trust,
                collateral=collateral, epoch_state=epoch_state, pool_keys=pool_keys, clock=clock, rng=rng))
            self._loop.call(self._async.connect())
        except BaseException:
            self._loop.stop()
            raise

    @staticmethod
    async def _make(*args: Any, **kwargs: Any) -> AsyncResultSubscriber:
        # Built on the loop's thread: its queue belongs to that loop.
        return AsyncResultSubscriber(*args, **kwargs)

    def __enter__(self) -> ResultSubscriber:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(handled=exc_type is None)

    def __iter__(self) -> Iterator[PipelineResult]:
        while True:
            try:
                yield self.receive()
            except ClientClosed:
                return

    @property
    def pipeline(self) -> str:
        return self._async.pipeline

    @property
    def inbox(self) -> str:
        return self._async.inbox

    @property
    def public_key(self) -> bytes:
        return self._async.public_key

    @property
    def info(self) -> bodies.PipelineInfo | None:
        return self._async.info

    @property
    def claims(self) -> Claims | None:
        return self._async.claims

    @property
    def received(self) -> int:
        return self._async.received

    @property
    def duplicates(self) -> int:
        return self._async.duplicates

    @property
    def refused(self) -> int:
        return self._async.refused

    @property
    def refusals(self) -> Counter[str]:
        return Counter(self._async.refusals)

    def receive(self, timeout: float | None = None) -> PipelineResult:
        return self._loop.call(self._async.receive(timeout))

    def close(self, *, handled: bool = True) -> None:
        if self._loop.closed:
            return
        try:
            self._loop.call(self._async.close(handled=handled))
        finally:
            self._loop.stop()
