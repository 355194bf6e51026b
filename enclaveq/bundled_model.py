"""The demo's real pretrained model: Magika's content-type classifier, shipped in its wheel.

Magika (Google, Apache-2.0) classifies a file's content type from its first and last 1 KiB.
The ONNX file is read from the installed ``magika`` package -- nothing is downloaded. This
module turns bytes into the model's input the way Magika's v2 feature extraction does: up to
``block_size`` bytes from each end, whitespace stripped, the first ``beg_size`` and last
``end_size`` bytes as integers, padded with ``padding_token``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

MODEL_NAME = "standard_v3_3"


@dataclass(frozen=True)
class MagikaModel:
    path: Path
    labels: tuple[str, ...]
    beg_size: int
    end_size: int
    block_size: int
    padding_token: int
    input_name: str = "bytes"
    output_name: str = "target_label"

    def features(self, content: bytes) -> np.ndarray:
        """One file's bytes -> int32 array of shape [1, beg_size + end_size]."""
        window = min(self.block_size, len(content))
        beg = content[:window].lstrip()[: self.beg_size]
        end = content[len(content) - window:].rstrip()
        end = end[max(0, len(end) - self.end_size):]
        pad = self.padding_token
        row = list(beg) + [pad] * (self.beg_size - len(beg)) + [pad] * (self.end_size - len(end)) + list(end)
        return np.asarray([row], dtype=np.int32)

    def label(self, scores: np.ndarray) -> tuple[str, float]:
        index = int(np.argmax(scores[0]))
        return self.labels[index], float(scores[0][index])


@lru_cache(maxsize=1)
def magika_model() -> MagikaModel:
    folder = Path(str(resources.files("magika"))) / "models" / MODEL_NAME
    config = json.loads((folder / "config.min.json").read_text())
    return MagikaModel(path=folder / "model.onnx", labels=tuple(config["target_labels_space"]),
                       beg_size=config["beg_size"], end_size=config["end_size"], block_size=config["block_size"],
                       padding_token=config["padding_token"])


# Small confidential-looking documents of different types for the demo and the benchmark.
SAMPLE_DOCUMENTS: dict[str, bytes] = {
    "payroll.csv": b"employee_id,name,salary_eur,iban\n" + b"".join(
        f"{i},Employee {i},{40000 + 137 * i},DE{10**19 + i}\n".encode() for i in range(60)),
    "patient.json": b'{\n  "patient": {\n    "id": "P-20931",\n    "diagnosis": "hypertension",\n'
                    b'    "medications": ["lisinopril", "amlodipine"],\n    "vitals": {"bp": "142/91", "hr": 77}\n'
                    b'  },\n  "clinician": "Dr. Okafor",\n  "visit": "2026-11-02",\n'
                    b'  "notes": "follow up in 3 months; repeat potassium and creatinine"\n}\n',
    "merger_memo.html": b"<!DOCTYPE html>\n<html><head><title>Project Heron</title></head><body>\n"
                        + b"<p>Board memo: proposed acquisition terms, strictly confidential.</p>\n" * 20
                        + b"</body></html>\n",
    "risk_model.py": b"import numpy as np\n\n\ndef value_at_risk(returns, alpha=0.99):\n"
                     b"    \"\"\"Historical VaR of a portfolio.\"\"\"\n    ordered = np.sort(returns)\n"
                     b"    index = int((1 - alpha) * len(ordered))\n    return -ordered[index]\n\n" * 6,
    "rotate_keys.sh": b"#!/bin/bash\nset -euo pipefail\n" + b"vault kv put secret/db password=\"$(openssl rand -hex 32)\"\n"
                      b"systemctl restart payments-api\necho \"rotated at $(date -u)\"\n" * 10,
    "contract.md": b"# Master Services Agreement\n\n## 1. Definitions\n\n- **Client** means the party "
                   b"receiving the services.\n- **Provider** means ...\n\n## 2. Fees\n\nFees are payable within "
                   b"*30 days* of invoice.\n\n" * 8,
}
