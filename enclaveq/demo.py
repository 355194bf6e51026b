"""`enclaveq demo`: the whole confidential flow in one process, on the embedded memory broker.

A simulated enclave worker founds a pool; a producer challenges it with a fresh nonce,
verifies the evidence against a policy pinning the worker's measurement, uploads a real
pretrained model (Magika's content-type classifier, from its wheel) sealed to the pool, runs
a batch of confidential documents through it, and checks every result against direct ONNX
Runtime. The upload is signed by the model owner's key, and a stranger's delete is refused.
Then the pool key is rotated: after a one-second grace period the epoch-1 key is erased, and
the demo checks that nothing in the worker's sealed state opens the batch's session any more.
A tap on the broker records every byte it carried, and the demo shows that none of the model,
the documents or the results ever crossed it in clear.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from attestation.policy import Policy
from attestation.sim.init import init_sim_dir
from broker_adapters import open_broker
from broker_adapters.memory import MemoryBroker
from enclave_worker.config import DEFAULT_WORKER_CONFIG
from enclave_worker.measurement import measure_worker
from enclave_worker.platform import sim_identity
from enclave_worker.worker import Worker
from producer_sdk import AsyncClient
from producer_sdk.errors import NotOwner
from protocol import crypto
from protocol.envelope import peek_request
from protocol.errors import DecryptionFailed
from protocol.ownership import generate_signing_key, public_key_bytes

from .bundled_model import SAMPLE_DOCUMENTS, magika_model

console = Console()


def _ok(text: str) -> None:
    console.print(f"[green]✔[/green] {text}")


async def run_demo(workdir: Path) -> int:
    url = f"memory://demo-{uuid.uuid4().hex[:8]}"
    pool = "demo"
    sim = init_sim_dir(workdir / "sim")
    measurement = measure_worker(DEFAULT_WORKER_CONFIG.measured())
    policy = Policy(measurements=(measurement.value.hex(),), allow_simulation=True,
                    sim_root_sha256=sim.root_sha256, max_evidence_age_seconds=60)
    console.rule("[bold]enclaveq demo: confidential inference on a simulated TEE")
    console.print("[yellow]SIMULATION: evidence is signed by a local key. It shows the protocol, "
                  "it gives no confidentiality against this machine's operator.[/yellow]")
    _ok(f"simulation root created, fingerprint {sim.root_sha256[:16]}…; worker measurement "
        f"{measurement.value.hex()[:16]}… pinned in the policy")

    tap = open_broker(url)
    assert isinstance(tap, MemoryBroker)  # memory:// (only the embedded broker can be tapped)
    await tap.connect()
    captured: list[bytes] = []
    tap.tap(captured.append)

    worker = Worker(broker_url=url, pool=pool, identity=sim_identity(workdir / "sim"), state_dir=workdir / "state")
    await worker.start()
    _ok(f"worker founded pool {pool!r}: epoch-1 HPKE pool key sealed to its storage")

    model = magika_model()
    model_bytes = model.path.read_bytes()
    names = list(SAMPLE_DOCUMENTS)
    inputs = [{model.input_name: model.features(SAMPLE_DOCUMENTS[n])} for n in names]
    try:
        async with AsyncClient(url, pool, policy, timeout=60) as client:
            claims, st = client.claims, client.statement
            if claims is None or st is None:
                raise RuntimeError("the client did not record the pool's attestation")
            _ok(f"attestation verified: platform {claims.platform} (simulated={claims.simulated}), measurement "
                f"{claims.measurement.hex()[:16]}… allowed, svn {claims.security_version} ≥ "
                f"{policy.min_security_version}, debug={claims.debug}")
            _ok(f"report data = SHA-512(statement) binds our fresh nonce {st.nonce.hex()[:16]}…, pool key "
                f"{st.pool_public_key.hex()[:16]}… and epoch {st.epoch}")
            _ok("session key drawn by the producer and HPKE-sealed (X25519, HKDF-SHA256, AES-256-GCM) to that key")

            started = time.perf_counter()
            owner = generate_signing_key()
            model_id = await client.upload_model(model_bytes, owner_key=owner)
            assert model_id == hashlib.sha256(model_bytes).hexdigest()
            _ok(f"model uploaded sealed ({len(model_bytes) / 1e6:.1f} MB, {time.perf_counter() - started:.2f}s); "
                f"model id = SHA-256 of its bytes = {model_id[:16]}…, signed by owner key "
                f"{public_key_bytes(owner).hex()[:16]}…")
            try:
                await client.delete_model(model_id, owner_key=generate_signing_key())
                console.print("[red]a stranger deleted the model[/red]")
                return 1
            except NotOwner:
                _ok("a delete signed by another key is refused (encrypted not_owner error)")

            started = time.perf_counter()
            results = {}
            async for result in client.submit(model_id, inputs):
                if result.error is not None:
                    raise result.error
                if result.outputs is None:
                    raise RuntimeError(f"job {result.index} returned no outputs")
                results[result.index] = result.outputs[model.output_name]
            elapsed = time.perf_counter() - started
            _ok(f"{len(inputs)} jobs ran in {elapsed * 1000:.0f} ms; results opened and authenticated")

            # A job of this session exactly as it would cross the broker, kept by an "attacker".
            core = client._core
            if core is None:
                raise RuntimeError("the client has no session")
            captured_job = core.job(model_id, inputs[0], timeout=60).body
            if not _opens_with_sealed_state(worker, captured_job):  # the check below must be able to fail
                console.print("[red]the sealed state does not hold the current pool key[/red]")
                return 1
            epoch, _ = await client.rotate_pool(grace_seconds=1)
            for _ in range(200):  # up to 10 s for every member to erase the epoch-1 key
                if worker.keys is None or not worker.keys.previous:
                    break
                await asyncio.sleep(0.05)
            if _opens_with_sealed_state(worker, captured_job):
                console.print("[red]the erased epoch's key is still in the sealed state[/red]")
                return 1
            _ok(f"pool key rotated to epoch {epoch}; after a 1 s grace period the epoch-1 key was erased: "
                "no key in the worker's sealed state opens this batch's session any more")
    finally:
        await worker.stop()
        await tap.close()

    direct = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    table = Table(title="confidential documents classified inside the (simulated) enclave")
    table.add_column("document")
    table.add_column("content type")
    table.add_column("score", justify="right")
    table.add_column("= direct onnxruntime")
    all_equal = True
    for index, name in enumerate(names):
        expected = direct.run(None, inputs[index])[0]
        equal = np.array_equal(expected, results[index])
        all_equal &= equal
        label, score = model.label(results[index])
        table.add_row(name, label, f"{score:.3f}", "yes" if equal else "[red]NO[/red]")
    console.print(table)
    if not all_equal:
        console.print("[red]results differ from direct onnxruntime[/red]")
        return 1
    _ok("every result equals direct onnxruntime output, bit for bit")

    # What an operator with the broker's full traffic would look for: any 32-byte window of
    # the model, of a job's input tensor (the documents' bytes as int32) or of a result.
    plaintexts = [model_bytes] + [i[model.input_name].tobytes() for i in inputs] + [r.tobytes() for r in results.values()]
    carried = b"\n".join(captured)
    leaked = [p for p in plaintexts if any(p[i:i + 32] in carried for i in range(0, max(1, len(p) - 31), 97))]
    if leaked:
        console.print(f"[red]{len(leaked)} plaintext fragments were visible on the broker[/red]")
        return 1
    _ok(f"the broker carried {len(captured)} messages ({sum(map(len, captured)) / 1e6:.1f} MB); none contains "
        "the model, a document or a result in clear")
    console.rule("[bold green]demo complete")
    return 0


def _opens_with_sealed_state(worker: Worker, sealed_job: bytes) -> bool:
    """Whether any pool key in the worker's sealed state (read back from disk) opens the job."""
    keys = worker.sealed_state.load_pool_keys()
    if keys is None:
        return False
    _, header = peek_request(sealed_job)
    for raw in [keys.pool_private_key] + [k.private_key for k in keys.previous]:
        try:
            crypto.open_session_key(header.sealed_session, crypto.load_private_key(raw), pool=worker.pool,
                                    epoch=header.epoch, session_id=header.session_id)
            return True
        except DecryptionFailed:
            continue
    return False


def main() -> int:
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="enclaveq-demo-") as tmp:
        return asyncio.run(run_demo(Path(tmp)))
