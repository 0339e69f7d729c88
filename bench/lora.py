"""LoRA against a full fine-tune of the demo audio tower, side by side in one run (issue #21).

    python -m bench.lora             # the task of docs/training.md: about 5 minutes on 2 cores
    python -m bench.lora --quick     # a shorter run of the same task: about 2 minutes

The task: the shipped demo model with its audio trunk's projection matrices perturbed (Gaussian
noise of 2.5 times each matrix's standard deviation, seed 0; ``perturbed_demo``), which drops
the audio figures of ``demo eval`` far enough that training visibly restores them. Every case
then trains the audio tower from those weights with the same data, steps, batches, learning
rate and seed (``train --init ... --train-towers audio``): a full fine-tune, and LoRA at the
ranks, ``--lora-targets`` and ``--lora-norms`` settings of ``CASES``. For each case the bench
reports its trainable parameters (and their fraction of the full fine-tune's), its four audio
figures (audio->text zero-shot class and scene, audio->image class and scene) and each figure's
ratio to the full fine-tune's; the issue's bar is a fraction under 0.1 with every ratio at 0.9
or more. Writes ``bench/results/lora_demo_audio.json`` (``.md`` beside it) and a plot.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from bench._common import log, machine_info, write_json
from train.lora import LORA_TARGETS

RESULTS = Path(__file__).resolve().parent / "results"
DEMO = "imagebind_demo"
# The bar: under this fraction of the full fine-tune's trainable parameters ...
MAX_FRACTION = 0.1
# ... with every audio figure at this ratio of the full fine-tune's or more.
MIN_RATIO = 0.9
FIGURES = ("audio->text class", "audio->text scene", "audio->image class", "audio->image scene")


@dataclass(frozen=True)
class Case:
    """One training run: 0 is a full fine-tune; otherwise LoRA at ``rank``."""

    name: str
    rank: int = 0
    targets: tuple[str, ...] = LORA_TARGETS
    norms: bool = True

    def options(self) -> dict[str, Any]:
        """``run_train_init`` keyword arguments (the CLI's ``--lora-*`` options)."""
        if not self.rank:
            return {}
        return {"lora_rank": self.rank, "lora_targets": self.targets, "lora_norms": self.norms}

    def flags(self) -> str:
        """The same as command-line options."""
        if not self.rank:
            return ""
        out = f"--lora-rank {self.rank}"
        if self.targets != LORA_TARGETS:
            out += f" --lora-targets {','.join(self.targets)}"
        return out + ("" if self.norms else " --no-lora-norms")


FULL = Case("full fine-tune")
# Rank 8 on an attention and an MLP projection, adapters only (the LoRA paper's setting): the
# demo tower is 64 wide, so rank 8 on all four projections is 1/6 of their weights.
BAR_CASE = Case("rank 8, qkv + fc1", 8, ("qkv", "fc1"), False)
CASES: tuple[Case, ...] = (
    FULL,
    Case("rank 8, all four + norms (default)", 8),
    BAR_CASE,
    Case("rank 8, out_proj + fc1 + norms", 8, ("out_proj", "fc1"), True),
    Case("rank 8, all four", 8, LORA_TARGETS, False),
    Case("rank 4, all four + norms", 4),
)


@dataclass(frozen=True)
class Task:
    """The training and evaluation settings every case shares."""

    world: int = 1500
    steps: int = 150
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    eval_n: int = 200
    threads: int = 2
    noise: float = 2.5


FULL_TASK = Task()
QUICK_TASK = Task(world=400, steps=80, batch_size=32, eval_n=100)


@dataclass
class Outcome:
    """What one case reached."""

    case: Case
    trainable: int
    full_finetune: int
    figures: dict[str, float]
    ratios: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def fraction(self) -> float:
        return self.trainable / self.full_finetune

    def meets_bar(self) -> bool:
        return self.fraction < MAX_FRACTION and min(self.ratios.values()) >= MIN_RATIO


def perturbed_demo(path: Path, noise: float = 2.5, seed: int = 0) -> Path:
    """The shipped demo weights, each audio trunk matrix plus ``noise`` std of Gaussian noise."""
    from safetensors.torch import load_file, save_file

    from encoders.weights import bundled_weights

    shipped = bundled_weights(DEMO)
    if shipped is None:
        raise RuntimeError("the demo weights are not bundled in this install")
    sd = load_file(str(shipped))
    g = torch.Generator().manual_seed(seed)
    for k, v in sd.items():
        if k.startswith("modality_trunks.audio.") and v.ndim == 2:
            w = v.float()
            sd[k] = (w + noise * w.std() * torch.randn(w.shape, generator=g)).to(v.dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def audio_figures(weights: Path, n: int) -> dict[str, float]:
    """The four audio figures of ``demo eval`` (fp32) for the demo model ``weights``."""
    from encoders import load_encoder, resolve_model
    from train.eval import evaluate

    model = load_encoder(resolve_model(DEMO, weights), dtype="fp32").model
    report = evaluate(model, n=n, arith_queries=10)
    zs, to_image = report["zero_shot"]["audio"], report["to_image"]["audio"]
    values = (zs["class"], zs["scene"], to_image["class"], to_image["scene"])
    return dict(zip(FIGURES, (float(v) for v in values), strict=True))


def train_case(case: Case, init: Path, out: Path, task: Task) -> Outcome:
    """Train the audio tower from ``init`` as ``case`` says; its figures (ratios left empty)."""
    from train.init import run_train_init

    t0 = time.perf_counter()
    card = run_train_init(
        str(init),
        out,
        "audio",
        config=DEMO,
        world=task.world,
        steps=task.steps,
        batch_size=task.batch_size,
        lr=task.lr,
        seed=task.seed,
        checkpoint_every=0,
        progress=False,
        threads=task.threads,
        **case.options(),
    )
    counts = card["trainable_params"]
    figures = audio_figures(Path(str(card["path"])), task.eval_n)
    seconds = time.perf_counter() - t0
    return Outcome(case, counts["trainable"], counts["full_finetune"], figures, seconds=seconds)


def run(cases: Sequence[Case], task: Task, work: Path) -> dict[str, Any]:
    """Every case on one perturbed model; ratios against the full fine-tune (the first case)."""
    if not cases or cases[0].rank:
        raise ValueError("the first case must be the full fine-tune (rank 0): the reference")
    torch.set_num_threads(task.threads)
    init = perturbed_demo(work / "perturbed.safetensors", task.noise, task.seed)
    start = audio_figures(init, task.eval_n)
    log(f"perturbed start: {_fmt(start)}")
    outcomes: list[Outcome] = []
    for i, case in enumerate(cases):
        log(f"[{i + 1}/{len(cases)}] {case.name} {case.flags()}".rstrip())
        outcomes.append(train_case(case, init, work / f"case{i}", task))
    ref = outcomes[0].figures
    for o in outcomes:
        o.ratios = {k: (o.figures[k] / ref[k] if ref[k] else float("nan")) for k in FIGURES}
    return {
        "bench": "lora",
        "task": asdict(task),
        "bar": {"max_fraction": MAX_FRACTION, "min_ratio": MIN_RATIO},
        "start": start,
        "cases": [
            {
                "name": o.case.name,
                "flags": o.case.flags(),
                "rank": o.case.rank,
                "targets": list(o.case.targets) if o.case.rank else None,
                "norms": o.case.norms if o.case.rank else None,
                "trainable": o.trainable,
                "full_finetune": o.full_finetune,
                "fraction": round(o.fraction, 4),
                "figures": o.figures,
                "ratios": {k: round(v, 4) for k, v in o.ratios.items()},
                "min_ratio": round(min(o.ratios.values()), 4),
                "meets_bar": o.meets_bar() if o.case.rank else None,
                "seconds": round(o.seconds, 1),
            }
            for o in outcomes
        ],
        "machine": machine_info(),
    }


def markdown(result: dict[str, Any]) -> str:
    """The result as the table of docs/training.md."""
    t = result["task"]
    lines = [
        f"Task: world {t['world']}, {t['steps']} steps, batch {t['batch_size']}, lr {t['lr']}, "
        f"evaluated on {t['eval_n']} held-out samples; CPU {result['machine']['cpu_model']} "
        f"({', '.join(result['machine']['cpu_flags']) or 'no listed ISA flags'}).",
        "",
        "| case | options | trainable (fraction) | "
        + " | ".join(FIGURES)
        + " | lowest ratio | bar |",
        "|---|---|---|" + "---|" * len(FIGURES) + "---|---|",
        "| perturbed start | | | "
        + " | ".join(f"{result['start'][k]:.3f}" for k in FIGURES)
        + " | | |",
    ]
    for c in result["cases"]:
        bar = {True: "met", False: "not met", None: "reference"}[c["meets_bar"]]
        flags = f"`{c['flags']}`" if c["flags"] else ""
        lines.append(
            f"| {c['name']} | {flags} | {c['trainable']:,} ({100 * c['fraction']:.1f} %) | "
            + " | ".join(f"{c['figures'][k]:.3f}" for k in FIGURES)
            + f" | {c['min_ratio']:.2f} | {bar} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> bool:
    """Lowest figure ratio against trainable fraction, the bar's region shaded; True if written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    low = min(0.8, *(c["min_ratio"] - 0.02 for c in result["cases"]))
    ax.fill_between([0.1, 100 * MAX_FRACTION], MIN_RATIO, 1.05, color="tab:green", alpha=0.1)
    ax.axvline(100 * MAX_FRACTION, color="tab:green", lw=1, ls="--")
    ax.axhline(MIN_RATIO, color="tab:green", lw=1, ls="--")
    markers = "osD^vP*X"
    for i, c in enumerate(result["cases"]):
        ax.scatter(
            [100 * c["fraction"]],
            [c["min_ratio"]],
            marker=markers[i % len(markers)],
            s=50,
            label=f"{c['name']} ({100 * c['fraction']:.1f} %, {c['min_ratio']:.2f})",
        )
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xlim(1, 150)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters, % of a full fine-tune (log)")
    ax.set_ylabel("lowest audio figure / full fine-tune's")
    ax.set_ylim(low, 1.05)
    ax.set_title("LoRA vs full fine-tune, demo audio tower (issue #21's bar: green)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _fmt(figures: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in figures.items())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="a shorter run of the same task")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", type=Path, default=None, help="JSON results path")
    ap.add_argument("--work", type=Path, default=None, help="where runs go (default: a temp dir)")
    args = ap.parse_args(argv)
    task = QUICK_TASK if args.quick else FULL_TASK
    task = Task(**{**asdict(task), "threads": args.threads})
    out = args.out or RESULTS / f"lora_demo_audio{'_quick' if args.quick else ''}.json"
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        result = run(CASES, task, args.work or Path(tmp))
    write_json(out, result)
    table = markdown(result)
    out.with_suffix(".md").write_text(table, encoding="utf-8")
    png = out.parent / "plots" / f"{out.stem}.png"  # bench/results/plots/ by default
    print(table)
    print(f"results: {out}" + (f"; plot: {png}" if plot(result, png) else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
