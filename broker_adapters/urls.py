"""Broker URLs: the one redactor every log line and error uses, and the check every URL passes
before an adapter is picked (so a mistyped URL is one clear error, never a parser's traceback)."""

from __future__ import annotations

from urllib.parse import urlsplit

from .errors import UnsupportedBrokerURL

SCHEMES = ("memory", "amqp", "amqps", "mqtt", "mqtts")


def check_broker_url(url: str) -> str:
    """The URL's scheme (lower case) if ``url`` is a broker URL enclaveq can use; else raise
    :class:`UnsupportedBrokerURL` saying what is wrong. Messages never repeat the userinfo."""
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
    """``url`` with its whole userinfo replaced by ``***``, whatever it contains.

    The authority ends at the first ``/``, ``?`` or ``#`` after ``://``; the userinfo is
    everything before its *last* ``@`` (a raw ``@`` in a password must not leave part of the
    password behind, as splitting at the first ``@`` would). URLs without a scheme or userinfo
    are returned unchanged.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return url
    return f"{scheme}://***@{host}{tail}"
