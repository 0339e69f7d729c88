"""Measure each default-mode departure from the official preprocessing on the embedding.

For every input where our default loader differs from ``official=True``, prints the cosine
between the two embeddings (the fixture's random-weight model, so it measures how much the
input change moves the model's output, not a retrieval score). Usage:

    python -m bench.departures [--fixtures ../shared/fixtures/imagebind-parity]
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np

from encoders import load_encoder


def _png16_mid_grey() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray((np.indices((240, 320)).sum(0) * 80 + 20000).astype(np.uint16))
    img.save(buf, format="PNG")
    return buf.getvalue()


def _short_wav() -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    t = np.arange(160) / 16000
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    default = Path(__file__).resolve().parents[2] / "shared/fixtures/imagebind-parity"
    ap.add_argument("--fixtures", type=Path, default=default)
    ap.add_argument("--out", type=Path, default=Path("bench/results/departures.json"))
    args = ap.parse_args()
    root: Path = args.fixtures
    enc = load_encoder(root / "checkpoint.pth", config=root / "config.json")
    cases: list[tuple[str, str, str | bytes]] = [
        ("vision", "EXIF orientation 6 applied", str(root / "inputs/img_exif_orient6_400x300.jpg")),
        ("vision", "alpha composited over white", str(root / "inputs/img_rgba_330x240.png")),
        ("vision", "16-bit PNG scaled, not clipped", _png16_mid_grey()),
        (
            "audio",
            "per-clip mean on a copy (44.1 kHz, 5 s)",
            str(root / "inputs/aud_44k1_stereo_pcm16_5s.wav"),
        ),
        (
            "audio",
            "per-clip mean on a copy (22.05 kHz, 3.3 s)",
            str(root / "inputs/aud_22k05_mono_pcm16_3.3s_silence.wav"),
        ),
        (
            "audio",
            "per-clip mean on a copy (16 kHz, 12.3 s: no overlap)",
            str(root / "inputs/aud_16k_stereo_pcm16_12.3s.wav"),
        ),
    ]
    rows = []
    print(f"{'modality':8}  {'departure':55}  cosine(default, official)")
    for modality, what, item in cases:
        a = enc.embed_items(modality, [item])
        b = enc.embed_items(modality, [item], official=True)
        cos = float((a * b).sum())
        rows.append({"modality": modality, "departure": what, "cosine": cos})
        print(f"{modality:8}  {what:55}  {cos:.6f}")
    # Audio shorter than one 25 ms frame: the official loader fails; ours pads.
    short = enc.embed_items("audio", [_short_wav()])
    rows.append(
        {
            "modality": "audio",
            "departure": "10 ms clip padded (official: error)",
            "cosine": None,
            "norm": float(np.linalg.norm(short)),
        }
    )
    print(f"{'audio':8}  {'10 ms clip padded (official: error)':55}  n/a (official fails)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"fixture": str(root), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
