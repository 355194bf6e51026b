"""`enclaveq demo`: the whole confidential flow in one process, on the embedded memory broker.

A simulated enclave worker founds a pool; a producer challenges it with a fresh nonce,
verifies the evidence against a policy pinning the worker's measurement, uploads a real
pretrained model (Magika's content-type classifier, from its wheel) sealed to the pool, runs
a batch of confidential documents through it, and checks every result against direct ONNX
Runtime. A tap on the broker records every byte it carried, and the demo shows that none of
the model, the documents or the results ever crossed it in clear.
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
from enclave_worker.config import DEFAULT_WORKER_CONFIG
from enclave_worker.measurement import measure_worker
from enclave_worker.platform import sim_identity
from enclave_worker.worker import Worker
from producer_sdk import AsyncClient

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
            _ok(f"attestation verified: platform {claims.platform} (simulated={claims.simulated}), measurement "
                f"{claims.measurement.hex()[:16]}… allowed, svn {claims.security_version} ≥ "
                f"{policy.min_security_version}, debug={claims.debug}")
            _ok(f"report data = SHA-512(statement) binds our fresh nonce {st.nonce.hex()[:16]}…, pool key "
                f"{st.pool_public_key.hex()[:16]}… and epoch {st.epoch}")
            _ok("session key drawn by the producer and HPKE-sealed (X25519, HKDF-SHA256, AES-256-GCM) to that key")

            started = time.perf_counter()
            model_id = await client.upload_model(model_bytes)
            assert model_id == hashlib.sha256(model_bytes).hexdigest()
            _ok(f"model uploaded sealed ({len(model_bytes) / 1e6:.1f} MB, {time.perf_counter() - started:.2f}s); "
                f"model id = SHA-256 of its bytes = {model_id[:16]}…")

            started = time.perf_counter()
            results = {}
            async for result in client.submit(model_id, inputs):
                if not result.ok:
                    raise result.error
                results[result.index] = result.outputs[model.output_name]
            elapsed = time.perf_counter() - started
            _ok(f"{len(inputs)} jobs ran in {elapsed * 1000:.0f} ms; results opened and authenticated")
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


def main() -> int:
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="enclaveq-demo-") as tmp:
        return asyncio.run(run_demo(Path(tmp)))
