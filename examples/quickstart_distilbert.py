"""BlindAI's quick start, model for model: a DistilBERT sequence classifier exported from PyTorch.

    pip install torch==2.13.0                     # the optional extra: pip install -e '.[torch]'
    python examples/quickstart_distilbert.py --broker amqp://guest:guest@127.0.0.1:5672/ \\
        --pool docs --policy policy.toml

The steps of the seed's quick start, one for one:

1. export ``DistilBertForSequenceClassification`` from PyTorch to ONNX (examples/export_distilbert.py,
   ``--head classifier``): one input, ``input_ids`` int64 of shape (1, 8) per job;
2. attest the pool and upload the model, sealed to the attested pool key (the SDK reads the input's
   name, type and shape from the ONNX file, where BlindAI's client was told them);
3. tokenize "Hello, my dog is cute" to 8 ids and run it in the enclave;
4. then the same for 1,000 sentences through ``AsyncClient.submit``, and print jobs/s.

**The weights are random** (seeded): pretrained DistilBERT weights cannot be downloaded offline, so
the model is the real architecture computing something deterministic but meaningless; its label
is printed only to show the round trip. Every result is checked against ONNX Runtime run directly
on the same file.

**The tokenizer is real**: bert-base-uncased's WordPiece vocabulary (the one DistilBERT uses), the
file ``make install`` fetches for the text pipeline (``enclaveq.pipeline_examples``), run by
onnxruntime-extensions' ``BertTokenizer`` here on the producer's side; ids are padded with [PAD] (0)
or truncated (keeping [SEP]) to 8, as ``tokenizer(..., padding="max_length", max_length=8)`` did.

**Default size**: 2 of DistilBERT's 6 layers at full width (hidden 768, 12 heads, FFN 3072,
vocabulary 30522): 38.6 M parameters, a 147 MiB file that exports in 2-15 s on 2 cores. ``--layers 6`` is the
full DistilBERT (67 M parameters, 255 MiB); smaller widths (``--hidden 64 --heads 2 --ffn 128``)
are for quick tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import sys
import tempfile
from pathlib import Path

import numpy as np

import example_common as common
from enclaveq import AsyncClient, Client, generate_signing_key, load_signing_key

SENTENCE = "Hello, my dog is cute"
SEQUENCE = 8
PAD, CLS, SEP = 0, 101, 102  # bert-base-uncased's ids of [PAD], [CLS] and [SEP]


def sentences(n: int) -> list[str]:
    """``n`` distinct sentences shaped like the quick start's, the quick start's first."""
    greetings = ("Hello", "Hi", "Look", "Wow", "Hey")
    pets = ("dog", "cat", "parrot", "rabbit", "horse", "goat", "hamster", "turtle", "pony", "puppy")
    words = ("cute", "loud", "tiny", "lazy", "clever", "fluffy", "grumpy", "happy", "sleepy", "brave",
             "noisy", "shy", "old", "young", "hungry", "curious", "gentle", "playful", "calm", "fast")
    made = [f"{g}, my {p} is {w}" for g, p, w in itertools.product(greetings, pets, words)]
    made.remove(SENTENCE)
    made.insert(0, SENTENCE)
    while len(made) < n:  # beyond 1,000: numbered variants
        made.append(f"{made[len(made) % 1000]} ({len(made) // 1000})")
    return made[:n]


class Tokenizer:
    """bert-base-uncased WordPiece (onnxruntime-extensions' BertTokenizer), to a fixed length."""

    def __init__(self, length: int = SEQUENCE) -> None:
        import onnxruntime as ort

        from enclaveq.pipeline_examples import session_options, tokenizer_graph

        self.length = length
        self._session = ort.InferenceSession(tokenizer_graph(), session_options(), providers=["CPUExecutionProvider"])

    def __call__(self, text: str) -> np.ndarray:
        """int64 [1, length]: [CLS] tokens [SEP], padded with [PAD] or truncated (keeping [SEP])."""
        ids = self._session.run(["input_ids"], {"text": np.array([text], dtype=object)})[0][0]
        if len(ids) > self.length:
            ids = np.concatenate([ids[:self.length - 1], [SEP]])
        padded = np.full((1, self.length), PAD, dtype=np.int64)
        padded[0, :len(ids)] = ids
        return padded


def export_model(args, out: Path) -> None:
    try:
        import export_distilbert as exporter  # exits with the install command if torch is missing
    except ImportError as exc:  # pragma: no cover - a broken torch install
        sys.exit(f"this example needs PyTorch: pip install torch==2.13.0 ({exc})")
    config = exporter.DistilBertConfig(n_layers=args.layers, dim=args.hidden, n_heads=args.heads,
                                       hidden_dim=args.ffn)
    model = exporter.build(config, "classifier", seed=args.seed, num_labels=2)
    params = sum(p.numel() for p in model.parameters())
    with common.timed() as took:
        exporter.export_classifier(model, config, out, sequence=SEQUENCE)
    print(f"exported DistilBertForSequenceClassification from PyTorch {exporter.torch.__version__}: {config.n_layers} "
          f"layers, hidden {config.dim}, {config.n_heads} heads, FFN {config.hidden_dim}, vocabulary "
          f"{config.vocab_size}; {params / 1e6:.1f} M parameters, RANDOM weights (seed {args.seed}: no pretrained "
          f"weights offline, so its labels mean nothing); {out.stat().st_size / 2**20:.1f} MiB in {took[0]:.1f} s")


def direct_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    """The reference: ONNX Runtime on the same file, outside any worker."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {"input_ids": ids})[0])


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


async def through_submit(args, owner, model_id: str, batch: np.ndarray) -> tuple[np.ndarray, float]:
    """Every row of ``batch`` as one (1, 8) job through AsyncClient.submit; logits in row order, seconds."""
    async with AsyncClient(args.broker, args.pool, args.policy, owner_key=owner, timeout=args.timeout) as client:
        print(common.attested(client.claims) + "  (AsyncClient)")
        logits = np.zeros((len(batch), 2), dtype=np.float32)
        with common.timed() as took:
            async for result in client.submit(model_id, ({"input_ids": batch[i:i + 1]} for i in range(len(batch)))):
                if not result.ok:
                    raise SystemExit(f"job {result.index} failed: {result.error}")
                logits[result.index] = result.outputs["logits"][0]
        if not args.keep_models:
            await client.delete_model(model_id)
    return logits, took[0]


def main(argv: list[str] | None = None) -> int:
    parser = common.connection_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=1000, help="jobs for AsyncClient.submit (default 1000)")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (default 2; DistilBERT has 6)")
    parser.add_argument("--hidden", type=int, default=768, help="hidden size (default 768)")
    parser.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    parser.add_argument("--ffn", type=int, default=3072, help="feed-forward size (default 3072)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--out", type=Path, default=None, help="keep the exported .onnx here (default: a temporary file)")
    args = parser.parse_args(argv)
    if args.hidden % args.heads or args.sentences < 1:
        parser.error("--hidden must be a multiple of --heads, and --sentences at least 1")
    owner = load_signing_key(args.owner_key) if args.owner_key else generate_signing_key()

    with tempfile.TemporaryDirectory(prefix="enclaveq-quickstart-") as scratch:
        path = args.out or Path(scratch) / "distilbert-classifier.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # before the export: a missing vocabulary is found in a second, not after it
            tokenize = Tokenizer()
        except Exception as exc:  # enclaveq.pipeline_examples names what to install or fetch
            print(f"error: {exc}", file=sys.stderr)
            return 1
        export_model(args, path)
        ids = tokenize(SENTENCE)
        print(f"tokens of {SENTENCE!r} (bert-base-uncased WordPiece, padded to {SEQUENCE}): {ids[0].tolist()}")

        with Client(args.broker, args.pool, args.policy, owner_key=owner, timeout=args.timeout) as client:
            print(common.attested(client.claims))
            with common.timed() as took:
                model_id = client.upload_model(path)
            if model_id != hashlib.sha256(path.read_bytes()).hexdigest():
                raise SystemExit("the pool named the model by another id than the file's SHA-256")
            print(f"uploaded, sealed to the attested pool key, in {took[0]:.1f} s: model id {model_id}")
            logits = client.run(model_id, {"input_ids": ids})["logits"]
        expected = direct_logits(path, ids)
        diff = float(np.abs(logits - expected).max())
        probs = softmax(logits)[0]
        print(f"enclave: logits [{logits[0, 0]:+.6f}, {logits[0, 1]:+.6f}], softmax [{probs[0]:.4f}, {probs[1]:.4f}], label "
              f"{int(probs.argmax())} (random weights); ONNX Runtime directly: max |difference| {diff:.1e}")
        if diff > 1e-4:
            print("error: the enclave's logits differ from ONNX Runtime's", file=sys.stderr)
            return 1

        texts = sentences(args.sentences)
        batch = np.concatenate([tokenize(text) for text in texts])
        got, seconds = asyncio.run(through_submit(args, owner, model_id, batch))
        expected = direct_logits(path, batch)
        diff = float(np.abs(got - expected).max())
        labels = np.bincount(got.argmax(axis=1), minlength=2).tolist()
        print(f"AsyncClient.submit: {len(texts)} sentences as (1, {SEQUENCE}) jobs in {seconds:.2f} s = "
              f"{len(texts) / seconds:.0f} jobs/s; labels {labels[0]} x 0, {labels[1]} x 1; "
              f"ONNX Runtime directly: max |difference| {diff:.1e}")
        if diff > 1e-4:
            print("error: the enclave's logits differ from ONNX Runtime's", file=sys.stderr)
            return 1
    if not args.keep_models:
        print(f"deleted model {model_id[:16]}… from the pool")
    return 0


if __name__ == "__main__":
    sys.exit(main())
