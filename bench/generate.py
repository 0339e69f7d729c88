"""Time per generated image over the time of one encoder forward, for the demo decoder.

Side by side, in one run, interleaved rep by rep: the demo decoder generating a batch of images
(``DemoDecoder.generate``: decode plus conversion to PIL images) against the demo encoder's
vision tower embedding a batch of the same size, at batch 1 and batch 16:

    python -m bench.generate [--threads 1] [--reps 20]

Writes bench/results/generate_demo.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench._common import log, machine_info, time_interleaved, write_json

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--out", type=Path, default=RESULTS / "generate_demo.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from encoders import load_encoder, resolve_model
    from generate.decoder import load_demo_decoder

    ref = resolve_model()  # the default model and the decoder made for it
    enc = load_encoder(ref, modalities=["vision"])
    dec = load_demo_decoder(ref.decoder, encoder_sha256=ref.sha256)
    size = enc.model.cfg.preprocess.image_size
    rng = np.random.default_rng(0)
    rows: dict[str, Any] = {}
    for b in args.batches:
        images = torch.from_numpy(rng.standard_normal((b, 3, size, size)).astype(np.float32))
        z = rng.standard_normal((b, dec.info.dim)).astype(np.float32)
        z /= np.linalg.norm(z, axis=1, keepdims=True)

        def encode(x: torch.Tensor = images) -> object:
            with torch.inference_mode():
                return enc.model.embed_one("vision", x, scaled=False)

        def generate(v: np.ndarray = z) -> object:
            return dec.generate(v)

        t = time_interleaved(
            {"encoder_vision_forward": encode, "decoder_generate": generate},
            warmup=3,
            reps=args.reps,
        )
        enc_s, gen_s = t["encoder_vision_forward"].median_s, t["decoder_generate"].median_s
        rows[f"batch_{b}"] = {
            "batch": b,
            "encoder_vision_forward": t["encoder_vision_forward"],
            "decoder_generate": t["decoder_generate"],
            "generate_over_encode": gen_s / enc_s,
            "ms_per_generated_image": 1000 * gen_s / b,
            "ms_per_encoded_image": 1000 * enc_s / b,
        }
        log(
            f"batch {b}: generate / encoder forward = {gen_s / enc_s:.2f} "
            f"({1000 * gen_s / b:.2f} vs {1000 * enc_s / b:.2f} ms per image)"
        )
    result = {
        "what": "demo decoder generate() time over demo encoder vision forward time, same batch",
        "decoder": {
            "image_size": dec.info.image_size,
            "params": sum(p.numel() for p in dec.model.parameters()),
        },
        "machine": machine_info(),
        "results": rows,
    }
    write_json(args.out, result)
    summary = {k: round(v["generate_over_encode"], 3) for k, v in rows.items()}
    print(json.dumps({"generate_over_encode": summary}))
    return result


if __name__ == "__main__":
    main()
