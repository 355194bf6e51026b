"""Images: RapidOCR's text detector (and recogniser) on a rendered confidential page, run in the enclave.

    pip install rapidocr-onnxruntime==1.4.4         # ships PP-OCRv4's ONNX models in its wheel
    python examples/ocr_detect.py --broker amqp://guest:guest@127.0.0.1:5672/ --pool docs --policy policy.toml
    python examples/ocr_detect.py ... --detect-only  # text boxes only, one model

BlindAI said it runs image and audio models too; this is the image half, with real pretrained models
that a PyPI wheel ships (``rapidocr-onnxruntime``: PaddleOCR's PP-OCRv4 text detector, its
direction classifier and its recogniser, converted to ONNX). A page of made-up confidential
text is rendered with Pillow (its built-in font, so nothing depends on the fonts installed), and
RapidOCR reads it with its own pre- and post-processing, but every model call -- the detector
on the whole page, the classifier and recogniser on each line it found -- is an enclave job: the
producer uploads the three models sealed to the attested pool key, and RapidOCR's ONNX Runtime
sessions are swapped for calls of ``Client.run``. The broker and the worker's host only see
sealed pixels and sealed results (with a hardware TEE; the simulation protects nothing).

Checked twice against ONNX Runtime run directly: every enclave job's outputs against the same
model's on the same input, and the whole result (boxes, text, scores) against an unmodified
RapidOCR reading the same image.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import example_common as common
from enclaveq import Client, generate_signing_key, load_signing_key

LINES = ("CONFIDENTIAL", "Hello, my dog is cute", "Invoice 2024-117: 4,250.00 EUR", "Patient 4471: glucose 7.9 mmol/L")
# RapidOCR's default is to upscale the page until its short side is 736 px; a small page is read as it is.
RAPIDOCR_OPTIONS = {"det_limit_type": "max", "det_limit_side_len": 960}
MODELS = {"det": "ch_PP-OCRv4_det_infer.onnx", "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
          "rec": "ch_PP-OCRv4_rec_infer.onnx"}


def render(lines: tuple[str, ...] = LINES) -> bytes:
    """A white page with ``lines`` in black, as PNG bytes (Pillow's built-in scalable font, 28 px)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=28)
    page = Image.new("RGB", (640, 60 + 48 * len(lines)), "white")
    draw = ImageDraw.Draw(page)
    for i, line in enumerate(lines):
        draw.text((32, 30 + 48 * i), line, fill="black", font=font)
    out = io.BytesIO()
    page.save(out, "PNG")
    return out.getvalue()


def model_path(stage: str) -> Path:
    import rapidocr_onnxruntime

    path = Path(rapidocr_onnxruntime.__file__).parent / "models" / MODELS[stage]
    if not path.is_file():
        raise SystemExit(f"{path} is missing: this example expects rapidocr-onnxruntime==1.4.4")
    return path


@dataclass
class EnclaveSession:
    """Stands in for RapidOCR's ``OrtInferSession``: the same call, run as a job in the enclave.
    Keeps every input and output, so that they can be checked against ONNX Runtime afterwards."""

    client: Client
    model_id: str
    input_name: str
    output_names: list[str]
    calls: list[tuple[np.ndarray, list[np.ndarray]]] = field(default_factory=list)

    def __call__(self, tensor: np.ndarray) -> list[np.ndarray]:
        outputs = self.client.run(self.model_id, {self.input_name: np.ascontiguousarray(tensor, np.float32)})
        result = [outputs[name] for name in self.output_names]
        self.calls.append((tensor, result))
        return result


def engine() -> Any:
    from rapidocr_onnxruntime import RapidOCR

    return RapidOCR(**RAPIDOCR_OPTIONS)


def stage_sessions(ocr: Any) -> dict[str, Any]:
    """RapidOCR's three ONNX Runtime sessions, by stage (the recogniser names its ``session``)."""
    return {"det": ocr.text_det.infer, "cls": ocr.text_cls.infer, "rec": ocr.text_rec.session}


def read_page(ocr: Any, image: bytes, detect_only: bool) -> list[tuple[list[list[float]], str, float]]:
    """(box, text, score) per line; with ``detect_only`` the text is empty and the score 1."""
    if detect_only:
        boxes, _ = ocr.text_det(ocr.load_img(image))
        ordered = sorted([] if boxes is None else boxes.tolist(), key=lambda box: (box[0][1], box[0][0]))
        return [(box, "", 1.0) for box in ordered]  # top to bottom, as RapidOCR orders full results
    result, _ = ocr(image)
    return [(box, text, float(score)) for box, text, score in (result or [])]


def main(argv: list[str] | None = None) -> int:
    parser = common.connection_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--detect-only", action="store_true", help="run the text detector only (one model)")
    parser.add_argument("--save-image", type=Path, default=None, help="also write the rendered page as a PNG")
    args = parser.parse_args(argv)
    try:
        import PIL  # noqa: F401  (both come with rapidocr-onnxruntime)
        import rapidocr_onnxruntime  # noqa: F401
    except ImportError as exc:
        print(f"error: {exc}: pip install rapidocr-onnxruntime==1.4.4", file=sys.stderr)
        return 1
    owner = load_signing_key(args.owner_key) if args.owner_key else generate_signing_key()
    image = render()
    if args.save_image:
        args.save_image.write_bytes(image)
    print(f"rendered a {len(LINES)}-line confidential page with Pillow ({len(image)} bytes of PNG)")
    stages = ["det"] if args.detect_only else ["det", "cls", "rec"]

    reference = engine()
    direct = read_page(reference, image, args.detect_only)
    ocr = engine()
    with Client(args.broker, args.pool, args.policy, owner_key=owner, timeout=args.timeout) as client:
        print(common.attested(client.claims))
        sessions = stage_sessions(ocr)
        enclave: dict[str, EnclaveSession] = {}
        for stage in stages:
            with common.timed() as took:
                model_id = client.upload_model(model_path(stage))
            original = sessions[stage]
            enclave[stage] = EnclaveSession(client, model_id, original.get_input_names()[0],
                                            original.get_output_names())
            print(f"uploaded {MODELS[stage]} ({model_path(stage).stat().st_size / 2**20:.1f} MiB) in {took[0]:.1f} s: "
                  f"model id {model_id[:16]}…")
        ocr.text_det.infer = enclave["det"]
        if not args.detect_only:
            ocr.text_cls.infer, ocr.text_rec.session = enclave["cls"], enclave["rec"]
        with common.timed() as took:
            found = read_page(ocr, image, args.detect_only)
        jobs = ", ".join(f"{stage} {len(s.calls)} x {list(s.calls[0][0].shape)}" for stage, s in enclave.items() if s.calls)
        print(f"read the page in the enclave in {took[0]:.2f} s ({jobs})")
        if not args.keep_models:
            for session in enclave.values():
                client.delete_model(session.model_id)

    diff = 0.0
    for stage, session in enclave.items():
        for tensor, outputs in session.calls:
            expected = sessions[stage](tensor)
            diff = max(diff, *(float(np.abs(g - e).max()) for g, e in zip(outputs, expected)))
    same = len(found) == len(direct) and all(
        text == text_d and np.allclose(box, box_d, atol=1.0) and abs(score - score_d) < 1e-3
        for (box, text, score), (box_d, text_d, score_d) in zip(found, direct))
    print(f"every enclave job's outputs equal ONNX Runtime's on the same input: max |difference| {diff:.1e}; "
          f"unmodified RapidOCR reads the same page {'identically' if same else 'DIFFERENTLY'}")
    for box, text, score in found:
        (x0, y0), (x1, y1) = box[0], box[2]
        print(f"  box ({x0:.0f},{y0:.0f})-({x1:.0f},{y1:.0f})" + (f"  {score:.3f}  {text}" if text else ""))
    if diff > 1e-3 or not same:
        print("error: the enclave's results differ from ONNX Runtime's", file=sys.stderr)
        return 1
    if not args.keep_models:
        print(f"deleted {len(enclave)} model(s) from the pool")
    return 0


if __name__ == "__main__":
    sys.exit(main())
