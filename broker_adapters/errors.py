"""The exceptions every broker adapter raises, whatever broker is underneath.

::

    BrokerError                   anything the broker layer reports
     ├── BrokerUnavailable        cannot connect, or the connection went away mid-operation
     │    └── PublishTimeout      the broker took a message and did not confirm it in time
     ├── PublishFailed            the broker refused a message (nack, or over a size limit)
     │    └── Unroutable          a mandatory publish found no queue (undeclared pool, missing
     │                            reply queue, no live control consumer)
     ├── PoolBusy                 another worker holds the pool lock
     ├── QueueNotFound            consuming from a pool or reply queue that was never declared
     └── UnsupportedBrokerURL     ``open_broker`` does not know the URL's scheme

Third-party errors (aiormq, aio-pika) are translated into these at the adapter boundary, so
callers never import a client library to catch a broker failure. Messages name pools, queues
and sizes, never payload bytes: a job body is ciphertext today, but an exception message ends
up in logs that outlive any key.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base class for every error a broker adapter raises."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached, or the connection was lost during the operation.

    A publish that fails this way may still have reached the broker: the confirm was lost,
    not necessarily the message. Retrying can therefore duplicate it (at-least-once)."""


class PublishTimeout(BrokerUnavailable):
    """The broker took the message but did not confirm it within the adapter's
    ``confirm_timeout``. Like any ``BrokerUnavailable`` publish, it may or may not have been
    accepted: retrying can duplicate it."""


class PublishFailed(BrokerError):
    """The broker refused the message (negative confirm) or it exceeds the size limit."""


class PublishRefused(PublishFailed):
    """The broker answered the publish with a negative confirm: typically a full queue
    (``x-overflow: reject-publish`` at its length limit) or a broker under a resource alarm.
    Publishing the same message again later may succeed."""


class Unroutable(PublishFailed):
    """A mandatory publish was returned: no queue is bound to take it."""


class PoolBusy(BrokerError):
    """The pool lock is held by another worker (or already by this adapter)."""


class QueueNotFound(BrokerError):
    """Consuming from a pool or reply queue that does not exist."""


class UnsupportedBrokerURL(BrokerError, ValueError):
    """``open_broker`` was given a URL whose scheme no adapter handles (yet)."""


__all__ = [
    "BrokerError",
    "BrokerUnavailable",
    "PublishFailed",
    "PublishTimeout",
    "Unroutable",
    "PoolBusy",
    "QueueNotFound",
    "UnsupportedBrokerURL",
]
