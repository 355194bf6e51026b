"""Export a DistilBERT-shaped masked language model to ONNX, offline, with random weights.

    pip install torch==2.13.0          # optional extra: pip install -e '.[torch]'
    python examples/export_distilbert.py --out distilbert.onnx

No network and no weight download: the architecture is built here from its configuration
(DistilBERT base: 6 layers, hidden size 768, 12 heads, feed-forward 3072, vocabulary 30522,
512 positions) and initialised from a seeded generator, so the file is the size and shape of
the real thing and computes something deterministic, just not anything meaningful. The
masked-LM head's vocabulary projection is kept *untied* from the word embeddings (in the
pretrained model they share one matrix), which brings the file to about 345 MiB: a model
of at least 300 MB to exercise chunked uploads with.

The module names follow Hugging Face's ``DistilBertForMaskedLM`` (``distilbert.embeddings``,
``distilbert.transformer.layer.N.attention.q_lin``, ``vocab_projector``...), so a real
checkpoint's state dict would load into it with ``load_state_dict`` -- not done here.

Export uses ``torch.onnx.export(..., dynamo=False)``, the TorchScript exporter, opset 17, with
dynamic batch and sequence axes and every weight inside the one .onnx file (no external data
file): enclaveq uploads exactly one file. (The default ``dynamo=True`` exporter needs the
``onnxscript`` package, which is not needed here.)

Inputs: ``input_ids`` int64 [batch, sequence], ``attention_mask`` int64 [batch, sequence]
(1 = token, 0 = padding). Output: ``logits`` float32 [batch, sequence, vocabulary].

With ``--check`` (the default) the exported file is loaded in ONNX Runtime and its logits are
compared with PyTorch's on a sample batch. The script prints the file's size and SHA-256 (the
model id enclaveq will report for it).

``--head classifier`` exports ``DistilBertForSequenceClassification`` instead (the model of
BlindAI's quick start, which examples/quickstart_distilbert.py imports from here): one input,
``input_ids`` int64 [batch, sequence] with the sequence length fixed at export (``--sequence``,
default 8), the attention mask derived inside the graph from the padding id 0, and ``logits``
float32 [batch, labels] out (``--labels``, default 2). Without the untied vocabulary projection
the full-size classifier is about 255 MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

try:
    import torch
    from torch import nn
except ImportError:  # torch is an optional extra, never a dependency of enclaveq itself
    sys.exit("this example needs PyTorch: pip install torch==2.13.0  (or: pip install -e '.[torch]')")


@dataclass(frozen=True)
class DistilBertConfig:
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    n_layers: int = 6
    dim: int = 768
    n_heads: int = 12
    hidden_dim: int = 3072
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02


class Embeddings(nn.Module):
    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.dim)
        self.LayerNorm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], dtype=torch.long, device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions)[None])


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.dim // config.n_heads
        self.q_lin = nn.Linear(config.dim, config.dim)
        self.k_lin = nn.Linear(config.dim, config.dim)
        self.v_lin = nn.Linear(config.dim, config.dim)
        self.out_lin = nn.Linear(config.dim, config.dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # [b, l, dim] -> [b, heads, l, head_dim]
            return t.view(batch, -1, self.n_heads, self.head_dim).transpose(1, 2)

        q = heads(self.q_lin(x)) / math.sqrt(self.head_dim)
        k, v = heads(self.k_lin(x)), heads(self.v_lin(x))
        scores = q @ k.transpose(2, 3)  # [b, heads, l, l]
        padding = (mask == 0).view(batch, 1, 1, -1)
        scores = scores.masked_fill(padding, torch.finfo(scores.dtype).min)
        context = torch.softmax(scores, dim=-1) @ v  # [b, heads, l, head_dim]
        return self.out_lin(context.transpose(1, 2).reshape(batch, -1, dim))


class FFN(nn.Module):
    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__()
        self.lin1 = nn.Linear(config.dim, config.hidden_dim)
        self.lin2 = nn.Linear(config.hidden_dim, config.dim)
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.activation(self.lin1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__()
        self.attention = MultiHeadSelfAttention(config)
        self.sa_layer_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.ffn = FFN(config)
        self.output_layer_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.sa_layer_norm(x + self.attention(x, mask))
        return self.output_layer_norm(x + self.ffn(x))


class Transformer(nn.Module):
    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = block(x, mask)
        return x


class DistilBertModel(nn.Module):
    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(config)
        self.transformer = Transformer(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.embeddings(input_ids), attention_mask)


class DistilBertForMaskedLM(nn.Module):
    """DistilBERT with its masked-LM head; ``vocab_projector`` is not tied to the embeddings."""

    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__()
        self.distilbert = DistilBertModel(config)
        self.vocab_transform = nn.Linear(config.dim, config.dim)
        self.activation = nn.GELU()
        self.vocab_layer_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.vocab_projector = nn.Linear(config.dim, config.vocab_size)
        self.apply(lambda module: _init_weights(module, config.initializer_range))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.distilbert(input_ids, attention_mask)
        hidden = self.vocab_layer_norm(self.activation(self.vocab_transform(hidden)))
        return self.vocab_projector(hidden)


class DistilBertForSequenceClassification(nn.Module):
    """DistilBERT with Hugging Face's sequence-classification head: the [CLS] position's hidden
    state -> ``pre_classifier`` -> ReLU -> ``classifier`` (dropout is the identity in eval mode).

    Takes only ``input_ids``, as BlindAI's quick start exported it; unlike that export, the
    attention mask is derived from the ids (``pad_token_id`` is padding), so padded sentences
    attend to their tokens only.
    """

    def __init__(self, config: DistilBertConfig, num_labels: int = 2, pad_token_id: int = 0) -> None:
        super().__init__()
        self.pad_token_id = pad_token_id
        self.distilbert = DistilBertModel(config)
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, num_labels)
        self.apply(lambda module: _init_weights(module, config.initializer_range))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_token_id).long()
        hidden = self.distilbert(input_ids, mask)
        return self.classifier(torch.relu(self.pre_classifier(hidden[:, 0])))


HEADS = ("masked-lm", "classifier")


def build(config: DistilBertConfig, head: str = "masked-lm", *, seed: int = 0, num_labels: int = 2) -> nn.Module:
    """The model with seeded random weights, in eval mode; ``head`` is one of ``HEADS``."""
    torch.manual_seed(seed)
    if head == "masked-lm":
        return DistilBertForMaskedLM(config).eval()
    if head == "classifier":
        return DistilBertForSequenceClassification(config, num_labels).eval()
    raise ValueError(f"unknown head {head!r}: one of {', '.join(HEADS)}")


def _init_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def sample_batch(config: DistilBertConfig, batch: int = 2, length: int = 16, seed: int = 1):
    """Token ids and an attention mask whose second row ends in padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator, dtype=torch.long)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1:, length // 2:] = 0
    return ids, mask


def export(model: nn.Module, config: DistilBertConfig, out: Path, opset: int) -> None:
    ids, mask = sample_batch(config)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo=True, which needs onnxscript.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (ids, mask), str(out), dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                          "logits": {0: "batch", 1: "sequence"}},
        )


def check(model: nn.Module, config: DistilBertConfig, out: Path) -> float:
    """Largest absolute difference between ONNX Runtime's and PyTorch's logits on a new shape."""
    import onnxruntime as ort

    ids, mask = sample_batch(config, batch=3, length=24, seed=2)  # not the traced shape: dynamic axes work
    with torch.no_grad():
        expected = model(ids, mask).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    if got.shape != expected.shape:
        raise SystemExit(f"ONNX Runtime gave logits of shape {got.shape}, PyTorch {expected.shape}")
    return float(abs(got - expected).max())


def export_classifier(model: nn.Module, config: DistilBertConfig, out: Path, *, opset: int = 17,
                      sequence: int = 8) -> None:
    """Export a ``DistilBertForSequenceClassification``: ``input_ids`` int64 [batch, sequence]
    (batch dynamic, sequence fixed, as BlindAI's quick start traced it) -> ``logits`` [batch, labels]."""
    ids = torch.randint(1, config.vocab_size, (1, sequence), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # as in export(): the TorchScript exporter
        torch.onnx.export(
            model, (ids,), str(out), dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=["input_ids"], output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch"}, "logits": {0: "batch"}},
        )


def check_classifier(model: nn.Module, config: DistilBertConfig, out: Path, sequence: int = 8) -> float:
    """Largest absolute difference between ONNX Runtime's and PyTorch's logits on a padded batch of 3."""
    import onnxruntime as ort

    ids = torch.randint(1, config.vocab_size, (3, sequence), generator=torch.Generator().manual_seed(2))
    ids[1, sequence // 2:] = 0  # padding: the in-graph mask must hide it
    with torch.no_grad():
        expected = model(ids).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input_ids": ids.numpy()})
    if got.shape != expected.shape:
        raise SystemExit(f"ONNX Runtime gave logits of shape {got.shape}, PyTorch {expected.shape}")
    return float(abs(got - expected).max())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    defaults = DistilBertConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("distilbert.onnx"), help="where to write the model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--layers", type=int, default=defaults.n_layers)
    parser.add_argument("--hidden", type=int, default=defaults.dim)
    parser.add_argument("--heads", type=int, default=defaults.n_heads)
    parser.add_argument("--ffn", type=int, default=defaults.hidden_dim)
    parser.add_argument("--vocab", type=int, default=defaults.vocab_size)
    parser.add_argument("--max-positions", type=int, default=defaults.max_position_embeddings)
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="compare ONNX Runtime's logits with PyTorch's (default: on)")
    parser.add_argument("--head", choices=HEADS, default="masked-lm",
                        help="masked-lm (default) or classifier (DistilBertForSequenceClassification)")
    parser.add_argument("--labels", type=int, default=2, help="classifier: number of labels (default 2)")
    parser.add_argument("--sequence", type=int, default=8,
                        help="classifier: the fixed sequence length of input_ids (default 8)")
    args = parser.parse_args(argv)
    if args.hidden % args.heads:
        parser.error("--hidden must be a multiple of --heads")
    config = DistilBertConfig(vocab_size=args.vocab, max_position_embeddings=args.max_positions,
                              n_layers=args.layers, dim=args.hidden, n_heads=args.heads, hidden_dim=args.ffn)

    if args.sequence < 1 or args.sequence > config.max_position_embeddings or args.labels < 1:
        parser.error("--sequence must be 1..--max-positions and --labels at least 1")
    model = build(config, args.head, seed=args.seed, num_labels=args.labels)
    params = sum(p.numel() for p in model.parameters())
    kind = "masked LM" if args.head == "masked-lm" else f"sequence classifier ({args.labels} labels)"
    print(f"DistilBERT-shaped {kind}: {config.n_layers} layers, hidden {config.dim}, {config.n_heads} heads, "
          f"FFN {config.hidden_dim}, vocabulary {config.vocab_size}, {config.max_position_embeddings} positions; "
          f"{params / 1e6:.1f} M parameters (random, seed {args.seed}), torch {torch.__version__}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.head == "classifier":
        export_classifier(model, config, args.out, opset=args.opset, sequence=args.sequence)
        axes = f"input_ids int64 [batch, {args.sequence}], dynamic batch axis"
    else:
        with torch.no_grad():
            export(model, config, args.out, args.opset)
        axes = "dynamic batch and sequence axes"
    seconds = time.perf_counter() - started
    size = args.out.stat().st_size
    print(f"exported {args.out} in {seconds:.1f} s (opset {args.opset}, {axes})")
    if args.check:
        started = time.perf_counter()
        diff = (check_classifier(model, config, args.out, args.sequence) if args.head == "classifier"
                else check(model, config, args.out))
        print(f"ONNX Runtime matches PyTorch: max |logits difference| = {diff:.2e} "
              f"({time.perf_counter() - started:.1f} s)")
        if diff > 1e-3:
            print("error: the exported model does not compute what the PyTorch model does", file=sys.stderr)
            return 1
    print(f"size   {size} bytes ({size / 2**20:.1f} MiB)")
    print(f"sha256 {sha256_of(args.out)}  (the model id `enclaveq model upload` prints)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
