"""Broker URLs as they may be shown to people: the one redactor every log line and error uses."""

from __future__ import annotations


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
