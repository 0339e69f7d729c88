"""Issue #21's bar for LoRA: at rank 8, on the demo audio tower, LoRA reaches >= 0.9 of a full
fine-tune's audio figures with < 10 % of its trainable parameters.

The task is ``bench.lora``'s (the shipped demo model with its audio trunk's projections
perturbed, which drops the audio figures; then the same training from there, full and LoRA),
in its short ``--quick`` form. The case is rank 8 on one attention and one MLP projection,
adapters only (``--lora-targets qkv,fc1 --no-lora-norms``): the demo tower is 64 wide, so rank
8 on all four projections is a sixth of their weights. ``python -m bench.lora`` measures every
case side by side with the longer task; docs/training.md has the figures. Seeded, two threads,
evaluated in fp32.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bench.lora import (
    BAR_CASE,
    FIGURES,
    FULL,
    MAX_FRACTION,
    MIN_RATIO,
    QUICK_TASK,
    audio_figures,
    perturbed_demo,
    train_case,
)


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(QUICK_TASK.threads)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("threads")
def test_lora_rank_8_reaches_the_full_fine_tune_with_under_a_tenth_of_its_parameters(
    tmp_path: Path,
) -> None:
    assert BAR_CASE.rank == 8
    init = perturbed_demo(tmp_path / "perturbed.safetensors")
    start = audio_figures(init, QUICK_TASK.eval_n)
    full = train_case(FULL, init, tmp_path / "full", QUICK_TASK)
    lora = train_case(BAR_CASE, init, tmp_path / "lora", QUICK_TASK)

    # The perturbation leaves something to learn: the start is far under the full fine-tune.
    assert min(start[k] / full.figures[k] for k in FIGURES) < 0.7, (start, full.figures)
    assert full.fraction == 1.0 and lora.full_finetune == full.trainable
    assert lora.fraction < MAX_FRACTION, lora.trainable
    ratios = {k: lora.figures[k] / full.figures[k] for k in FIGURES}
    assert min(ratios.values()) >= MIN_RATIO, (lora.figures, full.figures)


def test_the_docs_show_the_committed_bench_result() -> None:
    # docs/training.md's table is bench/results/lora_demo_audio.json's: every case's options,
    # trainable count and fraction, and its figures; and there the bar case meets the bar.
    import json

    root = Path(__file__).resolve().parents[1]
    result = json.loads((root / "bench/results/lora_demo_audio.json").read_text())
    docs = (root / "docs/training.md").read_text().replace("**", "")
    names = [c["name"] for c in result["cases"]]
    assert names[0] == FULL.name and BAR_CASE.name in names
    for c in result["cases"]:
        row = next(ln for ln in docs.splitlines() if ln.startswith(f"| {c['name']} |"))
        assert f"{c['trainable']:,} (" in row, row
        if c["flags"]:
            assert f"`{c['flags']}`" in row, row
        for k in FIGURES:
            assert f"| {c['figures'][k]:.3f} |" in row, (k, row)
    bar = next(c for c in result["cases"] if c["name"] == BAR_CASE.name)
    assert bar["meets_bar"] is True and bar["flags"] == BAR_CASE.flags()
    assert bar["fraction"] < MAX_FRACTION and bar["min_ratio"] >= MIN_RATIO
