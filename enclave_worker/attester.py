"""The worker's evidence: statements about its current pool key, and the TEE evidence over them.

Everything a worker says about itself goes through here -- answers to producers' challenges,
join answers to new members, rotation announcements -- so every statement binds the same
fields: domain, pool, epoch, pool public key, worker identity key, nonce, config digest.
"""

from __future__ import annotations

import asyncio

from protocol import crypto
from protocol.handshake import Challenge, EvidenceResponse, Statement

from .context import WorkerContext
from .keyring import Keyring


class Attester:
    def __init__(self, ctx: WorkerContext, *, keyring: Keyring) -> None:
        self._ctx = ctx
        self._keyring = keyring

    @property
    def platform(self) -> str:
        return self._ctx.identity.provider.platform

    def statement(self, nonce: bytes, *, epoch: int | None = None, pool_public_key: bytes | None = None) -> Statement:
        """A statement about the current key (or, when rotating, about the next one)."""
        return Statement(pool=self._ctx.pool, epoch=self._keyring.epoch if epoch is None else epoch,
                         suite=crypto.SUITE_ID,
                         pool_public_key=self._keyring.public_key if pool_public_key is None else pool_public_key,
                         worker_identity_key=self._keyring.identity_public_key, nonce=nonce,
                         config_digest=self._ctx.identity.config_digest)

    def evidence(self, statement: Statement) -> bytes:
        """The TEE's evidence over ``statement`` (blocking: a real TEE can take a second)."""
        return self._ctx.identity.provider.evidence(statement.report_data())

    def answer(self, challenge: Challenge) -> EvidenceResponse:
        statement = self.statement(challenge.nonce)
        return EvidenceResponse(platform=self.platform, evidence=self.evidence(statement), statement=statement,
                                worker_id=self._ctx.worker_id)

    async def answer_in_thread(self, challenge: Challenge) -> EvidenceResponse:
        # Off the event loop, which keeps serving jobs meanwhile.
        return await asyncio.to_thread(self.answer, challenge)
