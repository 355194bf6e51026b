"""Broker URLs: the one redactor every log line and error uses, and the check every URL passes
before an adapter is picked (so a mistyped URL is one clear error, never a parser's traceback).

A RabbitMQ cluster is given as a list of its nodes' URLs separated by commas, in the one
``--broker`` value: ``amqp://u:p@node1:5672/,amqp://u:p@node2:5672/``. Each is checked alone, all
must share one scheme, and only AMQP takes a list (Mosquitto has no clustering). A comma splits the
list only where another URL's scheme follows it."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from .errors import UnsupportedBrokerURL

SCHEMES = ("memory", "amqp", "amqps", "mqtt", "mqtts")
# A comma that starts the next URL of a list (a comma followed by a scheme): a raw comma inside a
# password is then still part of its URL, and is redacted with it.
_LIST_SEPARATOR = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def split_broker_urls(url: str) -> list[str]:
    """The node URLs of a comma-separated list (one URL: a list of one); a comma splits only
    where the next URL's scheme follows it."""
    return [part.strip() for part in _LIST_SEPARATOR.split(url)]


def check_broker_url(url: str) -> str:
    """The URL's scheme (lower case) if ``url`` is a broker URL enclaveq can use, or a list of
    AMQP node URLs sharing one scheme; else raise :class:`UnsupportedBrokerURL` saying what is
    wrong. Messages never repeat the userinfo."""
    urls = split_broker_urls(url)
    if len(urls) == 1:
        return _check_one(urls[0])
    schemes = set()
    for one in urls:
        schemes.add(_check_one(one))
    if len(schemes) > 1:
        raise UnsupportedBrokerURL(f"{redact_url(url)}: the URLs of a list must share one scheme, not "
                                   f"{', '.join(sorted(schemes))}")
    scheme = schemes.pop()
    if scheme not in ("amqp", "amqps"):
        raise UnsupportedBrokerURL(f"{redact_url(url)}: only AMQP takes a list of node URLs (a RabbitMQ cluster); "
                                   f"{scheme}:// takes one URL")
    return scheme


def _check_one(url: str) -> str:
    if "://" not in url:
        shown = f"***@{url.rpartition('@')[2]}" if "@" in url else url  # user:password@host without a scheme
        raise UnsupportedBrokerURL(f"{shown!r} is not a broker URL: expected SCHEME://..., e.g. "
                                   "amqp://guest:guest@127.0.0.1:5672/, mqtt://127.0.0.1:1883/ or memory://NAME")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise UnsupportedBrokerURL(f"unsupported broker URL scheme {scheme or '(none)'!r}: expected memory://, "
                                   "amqp://, amqps://, mqtt:// or mqtts://")
    if scheme == "memory":
        return scheme
    try:
        port = parts.port  # raises for a port that is not a number in 0..65535
    except ValueError:
        host_and_port = parts.netloc.rpartition("@")[2]
        raise UnsupportedBrokerURL(f"{redact_url(url)}: the port in {host_and_port!r} is not a number "
                                   "from 1 to 65535") from None
    if port == 0:
        raise UnsupportedBrokerURL(f"{redact_url(url)}: port 0 is not a broker's port")
    if not parts.hostname:
        raise UnsupportedBrokerURL(f"{redact_url(url)}: no host name")
    return scheme


def redact_url(url: str) -> str:
    """``url`` with its whole userinfo replaced by ``***``, whatever it contains (each URL of a
    comma-separated list).

    The authority ends at the first ``/``, ``?`` or ``#`` after ``://``; the userinfo is
    everything before its *last* ``@`` (a raw ``@`` in a password must not leave part of the
    password behind, as splitting at the first ``@`` would). URLs without a scheme or userinfo
    are returned unchanged.
    """
    return ",".join(_redact_one(part) for part in _LIST_SEPARATOR.split(url))


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return url
    return f"{scheme}://***@{host}{tail}"
