"""The worker's evidence: statements about its current pool key, the TEE evidence over them, and
the checks of other members' evidence against the join policy.

Everything a worker says about itself goes through here -- answers to producers' challenges,
join answers to new members, rotation announcements -- so every statement binds the same
fields: domain, pool, epoch, pool public key, worker identity key, nonce, config digest.

Anyone who can publish to the broker can ask for evidence (a challenge, a join request) or make
the worker verify someone's (a join request, an epoch announcement). Both draw on a budget
(:class:`~enclave_worker.budget.TokenBucket`); over it, :class:`~enclave_worker.budget.OverBudget`
is raised and the control channel answers ``busy`` (or drops an announcement), which costs a
small publish at most.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from attestation.collateral_source import with_collateral
from attestation.verify import verify_evidence
from protocol import crypto
from protocol.handshake import Challenge, EvidenceResponse, Statement

from .budget import TokenBucket
from .context import WorkerContext
from .keyring import Keyring

# Evidence produced in answer to control messages (producers' challenges, joiners' requests).
# Each producer connect costs one piece of evidence per worker of the pool, and a real TEE takes
# ~10 ms to ~1 s per quote, through a device that serialises them. 20 a second sustained lets a
# fleet of producers re-attest after a rotation within seconds, while a flood of challenges can
# keep the TEE busy for at most that; a burst of 32 absorbs producers that all start together.
EVIDENCE_BURST = 32
EVIDENCE_PER_SECOND = 20.0
# Unsolicited peer evidence checked (join requests, epoch announcements): a check is a certificate
# chain and one or two signatures (~0.3 ms simulated, a few ms on real platforms), run on the event
# loop. A pool sees a join per starting worker and an announcement per rotation, so 50 a second
# never refuses a genuine one outside a flood, and a flood costs the loop a few percent at most.
# Answers to this worker's own join requests (bound to a nonce it chose) are not counted.
VERIFY_BURST = 32
VERIFY_PER_SECOND = 50.0


class Attester:
    def __init__(self, ctx: WorkerContext, *, keyring: Keyring, evidence_budget: TokenBucket | None = None,
                 verify_budget: TokenBucket | None = None) -> None:
        self._ctx = ctx
        self._keyring = keyring
        self.evidence_budget = evidence_budget or TokenBucket(rate=EVIDENCE_PER_SECOND, burst=EVIDENCE_BURST,
                                                             clock=ctx.monotonic)
        self.verify_budget = verify_budget or TokenBucket(rate=VERIFY_PER_SECOND, burst=VERIFY_BURST,
                                                         clock=ctx.monotonic)
        # One answer at a time in a thread: the TEE serialises quotes anyway, and a burst of
        # answers must not fill the default executor that inference runs in too.
        self._one_at_a_time = asyncio.Semaphore(1)
        self.answered = 0  # challenges answered with evidence (the worker's metrics read it)

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
        """Evidence in answer to a control message: raises OverBudget when the evidence budget is
        spent (checked before any work)."""
        self.evidence_budget.take("evidence requests")
        self.answered += 1
        # The statement is taken now, about the keys the caller just used (a join answer has
        # sealed them already); a rotation while this waits for the TEE changes nothing in it.
        statement = self.statement(challenge.nonce)
        async with self._one_at_a_time:
            # Off the event loop, which keeps serving jobs meanwhile.
            evidence = await asyncio.to_thread(self.evidence, statement)
        return EvidenceResponse(platform=self.platform, evidence=evidence, statement=statement,
                                worker_id=self._ctx.worker_id)

    def verify_peer(self, platform: str, evidence: bytes, statement: Statement, *, solicited: bool = False) -> None:
        """Check another worker's evidence over ``statement`` against our join policy (raises
        AttestationError). Unsolicited checks draw on the verification budget (OverBudget)."""
        if not solicited:
            self.verify_budget.take("peer evidence checks")
        identity = self._ctx.identity
        now = datetime.fromtimestamp(self._ctx.clock(), UTC)
        verify_evidence(platform, evidence, identity.join_policy, expected_report_data=statement.report_data(),
                        now=now, **with_collateral(identity.collateral, platform, now, identity.join_verify_options))
