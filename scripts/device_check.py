"""GPU check of the encoder path: utilisation of the imagebind_huge towers against cuBLAS.

Run on a CUDA machine: ``python scripts/device_check.py [--batch 8 64] [--out results.json]``.
Prints, per tower, dtype, attention path and batch, the achieved FLOP/s over the matmul
FLOP/s measured in the same run and dtype, and writes them as JSON. Random weights, real shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders import Modality, ModelConfig, load_encoder
from encoders.model import Attention


def tower_flops(cfg: ModelConfig, tower: str, batch: int) -> float:
    """Multiply-adds x2 of one forward of a tower (stem, blocks, head) for a batch of items."""
    m = Modality(tower)
    t = cfg.trunk(m)
    D, n = t.width, cfg.num_patches(m)
    L = n + (0 if m is Modality.TEXT else 1)
    Lk = L + (0 if m in (Modality.VISION, Modality.TEXT) else 1)  # bias_kv adds one key
    if m is Modality.VISION:
        stem = 2 * n * D * 3 * cfg.vision_patch[1] * cfg.vision_patch[2]  # summed time kernel
    elif m is Modality.AUDIO:
        stem = 2 * n * D * cfg.audio_patch**2
    else:
        stem = 0
    block = 2 * L * D * (3 * D + D + 2 * t.mlp_ratio * D) + 4 * L * Lk * D
    return float(batch * (stem + t.depth * block + 2 * D * cfg.embed_dim))


def cuda_time(fn, reps: int = 10, warmup: int = 3) -> float:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def matmul_flops(dtype: torch.dtype, n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    return 2 * n**3 / cuda_time(lambda: a @ b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--towers", default="vision,audio")
    ap.add_argument("--out", default="device_check.json")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    peaks = {str(dt): matmul_flops(dt) for dt in (torch.bfloat16, torch.float32)}
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__}")
    print("matmul TFLOP/s", {k: round(v / 1e12, 1) for k, v in peaks.items()})
    for tower in args.towers.split(","):
        shape = {"vision": (3, 224, 224), "audio": (1, 128, 204)}[tower]
        for dtype in (torch.bfloat16, torch.float32):
            enc = load_encoder(
                config="imagebind_huge", modalities=[tower], device="cuda", dtype=dtype
            )
            for batch in args.batch:
                x = torch.randn(batch, *shape, device="cuda", dtype=dtype)
                flops = tower_flops(enc.config, tower, batch)
                for fused in (True, False):
                    Attention.fused = fused
                    with torch.inference_mode():
                        model, name = enc.model, tower
                        sec = cuda_time(lambda: model.embed_one(name, x, scaled=False))  # noqa: B023
                    row = {
                        "tower": tower,
                        "dtype": str(dtype),
                        "batch": batch,
                        "attention": "sdpa" if fused else "eager",
                        "items_per_s": batch / sec,
                        "tflops": flops / sec / 1e12,
                        "ratio_to_matmul": flops / sec / peaks[str(dtype)],
                    }
                    rows.append(row)
                    print(
                        json.dumps(
                            {
                                k: (round(v, 3) if isinstance(v, float) else v)
                                for k, v in row.items()
                            }
                        )
                    )
                Attention.fused = True
            enc = None  # free the tower before the next dtype
            torch.cuda.empty_cache()
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "matmul_flops": peaks,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
