"""Speech models at their released shapes (random weights from transformers' default configs: Whisper's is
whisper-tiny's shape, Wav2Vec2's and HuBERT's the base models'): capture, Houlsby r=8 inserted with random adapter
weights, baked ONNX export, then ONNX Runtime against torch on audio-shaped inputs (a second of 16 kHz audio and
three seconds, Whisper's 3000 log-mel frames with 32 decoder ids). Prints and writes one JSON row per model.

python -m benchmarks.speech_shapes [--models whisper wav2vec2 hubert] [-o benchmarks/results/speech_shapes.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CONFIGS = {"whisper": "WhisperConfig", "wav2vec2": "Wav2Vec2Config", "hubert": "HubertConfig"}


def feeds_of(model_type: str, config) -> list[dict[str, np.ndarray]]:  # noqa: ANN001  a transformers config
    rng = np.random.default_rng(0)
    if model_type == "whisper":
        frames = 2 * config.max_source_positions
        return [
            {
                "input_features": rng.standard_normal((b, config.num_mel_bins, frames)).astype(np.float32),
                "decoder_input_ids": rng.integers(0, config.vocab_size, (b, 32)).astype(np.int64),
            }
            for b in (1, 2)
        ]
    return [{"input_values": rng.standard_normal((b, n)).astype(np.float32)} for b, n in ((1, 16000), (2, 48000))]


def run(model_type: str, folder: Path) -> dict:
    import onnxruntime as ort
    import transformers

    from exporters.onnx import export_onnx
    from surgery.adapters import AdapterSpec
    from surgery.pipeline import open_model, stand_in_adapted

    config = getattr(transformers, CONFIGS[model_type])()
    config.save_pretrained(folder)
    start = time.perf_counter()
    base = open_model(str(folder / "config.json"))
    captured_s = time.perf_counter() - start
    adapted = stand_in_adapted(base, AdapterSpec("houlsby", r=8), folder / "m.adapted.pt2", seed=0, weights_seed=7)
    start = time.perf_counter()
    export_onnx(adapted.gm, adapted.signature, folder / "m.onnx")
    export_s = time.perf_counter() - start
    session = ort.InferenceSession(str(folder / "m.onnx"), providers=["CPUExecutionProvider"])
    checks = []
    for feeds in feeds_of(model_type, config):
        with torch.no_grad():
            want = adapted.gm(**{k: torch.from_numpy(v) for k, v in feeds.items()})
            base_out = base.gm(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        got = session.run(None, feeds)
        diff = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))
        scale = max(float(w.abs().max()) for w in want)
        checks.append(
            {
                "shapes": {k: list(v.shape) for k, v in feeds.items()},
                "max_abs_diff": diff,
                "max_abs_torch": scale,
                "adapters_change_output_by": float((want[0] - base_out[0]).abs().max()),
            }
        )
    return {
        "model_type": model_type,
        "params": sum(p.numel() for p in base.gm.parameters()),
        "sites": len(adapted.manifest.sites),
        "capture_s": round(captured_s, 1),
        "export_s": round(export_s, 1),
        "checks": checks,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("-o", "--output", type=Path, default=None, help="write the rows here as JSON")
    args = parser.parse_args()
    import onnxruntime
    import transformers

    rows = []
    for model_type in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            row = run(model_type, Path(tmp))
        print(json.dumps(row))
        rows.append(row)
    report = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "rows": rows,
    }
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
