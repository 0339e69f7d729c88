"""Memory and start-up: peak resident memory of a loaded encoder over its weights, and time to
ready from a safetensors file (memory-mapped) over a torch ``.pth`` (``torch.load``).

A random-weight checkpoint of one ``imagebind_huge`` tower (audio with ``--quick``, vision
by default) is written to a temporary folder in both formats. Each load runs in a fresh
subprocess, formats interleaved, so every run starts alike (page cache warm after the first
pair, which is not timed):

* peak resident set size (``ru_maxrss``) after loading and one forward pass, less the
  resident size after the imports (ratio 9, target <= 1.2; the whole-process ratio is
  recorded too); on CUDA, the GPU's peak allocated bytes over the weights' bytes there;
* time to ready: ``load_encoder`` from call to return, median over repeats.

    .venv/bin/python -m bench.memory --quick
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

from bench._common import log, machine_info, write_json


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(ckpt: str, tower: str, device: str) -> dict[str, Any]:
    """In a fresh process: import, load, one forward; what it cost."""
    import torch

    from encoders import load_encoder

    torch.set_num_threads(1)
    base = _rss_bytes()
    t0 = time.perf_counter()
    enc = load_encoder(ckpt, config="imagebind_huge", modalities=[tower], device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    ready = time.perf_counter() - t0
    p = enc.preprocess_cfg
    x = (
        torch.zeros(1, 3, p.image_size, p.image_size)
        if tower == "vision"
        else torch.zeros(1, 1, p.audio_mel_bins, p.audio_target_length)
    )
    t1 = time.perf_counter()
    enc.embed(tower, x)
    first = time.perf_counter() - t1
    weights = sum(t.numel() * t.element_size() for t in enc.model.state_dict().values())
    out = {
        "ready_s": ready,
        "first_forward_s": first,
        "base_rss_bytes": base,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "weights_bytes_loaded": weights,
    }
    if device == "cuda":
        out["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def write_checkpoints(tower: str, folder: Path) -> tuple[dict[str, Path], int]:
    import torch
    from safetensors.torch import save_file

    from encoders import load_encoder

    enc = load_encoder(config="imagebind_huge", modalities=[tower], dtype=torch.float32)
    sd = {k: v.contiguous() for k, v in enc.model.state_dict().items()}
    size = sum(v.numel() * v.element_size() for v in sd.values())
    paths = {"torch.load": folder / "ckpt.pth", "safetensors": folder / "ckpt.safetensors"}
    torch.save(sd, paths["torch.load"])
    save_file(sd, str(paths["safetensors"]))
    return paths, size


def run_child(path: Path, tower: str, device: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "bench.memory",
        "--child",
        str(path),
        "--tower",
        tower,
        "--device",
        device,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1]
    )
    if proc.returncode != 0:
        raise RuntimeError(f"loading {path.name} failed:\n{proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run(tower: str, device: str, reps: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        log(f"writing a random imagebind_huge {tower} checkpoint (.pth and .safetensors)")
        paths, size = write_checkpoints(tower, tmp)
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in paths}
        for rep in range(reps + 1):  # the first pair warms the page cache: not counted
            order = list(paths) if rep % 2 == 0 else list(reversed(paths))
            for fmt in order:
                r = run_child(paths[fmt], tower, device)
                log(
                    f"  {fmt}: ready {r['ready_s']:.2f} s, peak RSS "
                    f"{r['peak_rss_bytes'] / 1e6:.0f} MB (base {r['base_rss_bytes'] / 1e6:.0f})"
                )
                if rep > 0:
                    runs[fmt].append(r)
        rss = {}
        for fmt, rs in runs.items():
            peak = statistics.median(r["peak_rss_bytes"] for r in rs)
            base = statistics.median(r["base_rss_bytes"] for r in rs)
            loaded = rs[0]["weights_bytes_loaded"]
            row = {
                "peak_rss_bytes": peak,
                "base_rss_bytes": base,
                "ratio": (peak - base) / size,
                "ratio_total": peak / size,
                "ready_s": statistics.median(r["ready_s"] for r in rs),
                "first_forward_s": statistics.median(r["first_forward_s"] for r in rs),
                "runs": rs,
            }
            if device == "cuda":
                gpu = statistics.median(r["gpu_peak_bytes"] for r in rs)
                row.update(
                    {"gpu_peak_bytes": gpu, "gpu_ratio": gpu / loaded, "host_ratio": row["ratio"]}
                )
                row["ratio"] = row["gpu_ratio"]  # on a GPU the weights live in its memory
            rss[fmt] = row
        t_st, t_pt = rss["safetensors"]["ready_s"], rss["torch.load"]["ready_s"]
        return {
            "model": f"imagebind_huge {tower} tower (random fp32 weights)",
            "weights_bytes": size,
            "file_bytes": {k: p.stat().st_size for k, p in paths.items()},
            "rss": rss,
            "ready": {"safetensors_s": t_st, "torch_s": t_pt, "ratio": t_st / t_pt},
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--tower",
        default=None,
        choices=["vision", "audio"],
        help="default: vision (audio with --quick)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="the audio tower, one timed pair")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    tower = a.tower or ("audio" if a.quick else "vision")
    if a.child:
        print(json.dumps(child(a.child, tower, a.device)))
        return 0
    reps = 1 if a.quick else a.reps
    result = {
        "benchmark": "memory",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": a.device,
        "quick": a.quick,
        "machine": machine_info(),
        **run(tower, a.device, reps),
    }
    w = result["weights_bytes"]
    print(f"\n{result['model']}: {w / 1e6:.0f} MB of weights")
    for fmt, r in result["rss"].items():
        print(
            f"(9) {fmt:<12} peak RSS {r['peak_rss_bytes'] / 1e6:.0f} MB - imports "
            f"{r['base_rss_bytes'] / 1e6:.0f} MB = {r['ratio']:.2f}x the weights "
            f"(whole process {r['ratio_total']:.2f}x; target <= 1.2); ready {r['ready_s']:.2f} s"
        )
    rd = result["ready"]
    print(
        f"(9) time to ready: safetensors {rd['safetensors_s']:.2f} s / torch.load "
        f"{rd['torch_s']:.2f} s = {rd['ratio']:.2f}"
    )
    out = a.out or Path(__file__).resolve().parent / "results" / f"memory_{a.device}.json"
    log(f"wrote {write_json(out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
