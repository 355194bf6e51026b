"""Click parameter types shared by the commands: values checked when the command line is read,
so a mistake is a usage error (exit 2, one line naming the option) before anything connects."""

from __future__ import annotations

from typing import Any

import click

from broker_adapters import check_broker_url
from broker_adapters.errors import UnsupportedBrokerURL


class BrokerUrl(click.ParamType):
    """A broker URL enclaveq can use (memory://, amqp(s)://, mqtt(s)://); errors never show its userinfo."""

    name = "URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            check_broker_url(str(value))
        except UnsupportedBrokerURL as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


BROKER_URL = BrokerUrl()
