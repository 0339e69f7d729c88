"""``bindsearch train --init``: bind or adapt some towers of an existing model, the rest frozen.

The recipe's stage 2 (``train.recipe.train``) run from loaded weights instead of random ones:
each named tower learns against the frozen image tower's cached embeddings (InfoNCE both ways,
the recipe's own loss and steps), every other parameter is frozen (``requires_grad`` False, not
in the optimizer) and comes out bit-identical in the exported weights, which are written in the
init file's dtype. ``reinit`` re-initialises the named towers first (binding a modality anew);
otherwise they are fine-tuned. Init weights that lack a tower (``openclip_vit_h14_bind``: only
OpenCLIP's image and text towers) gain it, freshly initialised, with ``reinit``; the export
holds the init file's towers and the trained ones.

The exported model says what it is: beside ``OUT/<name>.safetensors`` a JSON sidecar
``OUT/<name>.json`` (the same object is in the safetensors metadata under ``"init"``) with its
config, the init weights' sha256, the towers that changed, the data source and the licence,
which is the init weights' licence: the frozen towers are theirs, and the trained ones are
derived from them (or bound to them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from encoders.config import list_presets
from encoders.model import ImageBind, init_weights
from encoders.models import TOWER_MODULES, ModelRef, tower_hashes, tower_of_key

from .lora import LORA_TARGETS, parse_targets
from .recipe import STAGE2_MODALITIES

ANCHOR_NAMES = {"vision": "image", "video": "video"}  # as a manifest's columns name them

__all__ = [
    "BIG_TRUNK",
    "TOWER_MODULES",
    "TRAINABLE_TOWERS",
    "add_towers",
    "is_tower_key",
    "parse_towers",
    "reinit_towers",
    "resolve_init",
    "run_train_init",
    "sidecar_path",
]

# Gradient checkpointing is on by default for a tower whose trunk has at least this many
# parameters (every ``imagebind_huge`` tower that can train; not the demo or test towers).
BIG_TRUNK = 10_000_000

# The towers `--train-towers` accepts: those stage 2 binds to the frozen image tower. The
# vision tower is the anchor every other tower is trained against (its cached embeddings are
# the targets), so it cannot learn in this stage; text is bound to images in stage 1, with the
# vision tower learning too, which is not a frozen-anchor binding.
TRAINABLE_TOWERS = STAGE2_MODALITIES


def parse_towers(text: str) -> tuple[str, ...]:
    """``"audio,imu"`` -> ``("audio", "imu")``; a one-line ``ValueError`` for anything else."""
    names = [t.strip().lower() for t in text.split(",")]
    names = [t for t in names if t]
    accepted = ", ".join(TRAINABLE_TOWERS)
    if not names:
        raise ValueError(f"--train-towers is empty; accepted: a comma list of {accepted}")
    for t in names:
        if t in ("vision", "image", "video"):
            raise ValueError(
                f"--train-towers {t}: the vision tower is the frozen anchor the other towers "
                f"are bound to and cannot be trained here; accepted: {accepted}"
            )
        if t == "text":
            raise ValueError(
                "--train-towers text: text is bound to images in stage 1 (both towers "
                f"learning), not against a frozen anchor; accepted: {accepted}"
            )
        if t not in TRAINABLE_TOWERS:
            raise ValueError(f"--train-towers: unknown modality {t!r}; accepted: {accepted}")
    return tuple(dict.fromkeys(names))


def is_tower_key(key: str, towers: Sequence[str]) -> bool:
    """Whether a state-dict key belongs to one of ``towers`` (stem, trunk, head, postprocessor)."""
    return tower_of_key(key) in towers


@torch.no_grad()
def reinit_towers(model: ImageBind, towers: Sequence[str], seed: int = 0) -> None:
    """Give ``towers`` fresh random weights (the model's own ``init_weights``), in place."""
    fresh = ImageBind(model.cfg, tuple(towers), device="meta").to_empty(device="cpu")
    init_weights(fresh, seed=seed)
    new = fresh.state_dict()
    for key, t in model.state_dict().items():
        if is_tower_key(key, towers):
            t.copy_(new[key])


@torch.no_grad()
def add_towers(model: ImageBind, towers: Sequence[str], seed: int = 0) -> ImageBind:
    """``model`` with ``towers`` added (fresh random weights, as ``reinit_towers`` gives them)."""
    have = {m.value for m in model.modalities}
    new = [t for t in towers if t not in have]
    if not new:
        return model
    bigger = ImageBind(model.cfg, [*have, *new], device="meta").to_empty(device="cpu")
    result = bigger.load_state_dict(model.state_dict(), strict=False)
    if result.unexpected_keys or not all(is_tower_key(k, new) for k in result.missing_keys):
        raise RuntimeError(f"adding towers {new} did not keep the model's own keys: {result}")
    reinit_towers(bigger, new, seed=seed)
    return bigger


def resolve_init(init: str, config: str | Path | None = None) -> ModelRef:
    """``--init``: a preset with its weights (shipped or downloaded), or a checkpoint file.

    A file is read with ``config`` (default: the project's default model, as elsewhere); when
    it was exported by ``train --init`` (its sidecar names its sha256), the sidecar's licence
    is its licence (``encoders.models.weights_card``, read by ``resolve_model`` for every
    command), so a model trained from a trained model keeps the licence of the first.
    """
    from encoders import resolve_model

    path = Path(init)
    if path.is_file():
        return resolve_model(config, path)
    if init in list_presets():
        if config is not None:
            raise ValueError(
                f"--config is for a checkpoint file; --init {init} is a preset and brings its own"
            )
        return resolve_model(init)
    raise ValueError(
        f"--init {init}: neither a weights file nor a preset ({', '.join(list_presets())})"
    )


def sidecar_path(weights: str | Path) -> Path:
    """The JSON that describes exported weights: ``model.safetensors`` -> ``model.json``."""
    from encoders.models import card_path

    return card_path(weights)


def run_train_init(
    init: str,
    out: Path,
    train_towers: str,
    config: str | Path | None = None,
    reinit: bool = False,
    world: int = 6000,
    world_seed: int = 0,
    manifest: Path | None = None,
    steps: int = 400,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    checkpoint_every: int = 100,
    resume: bool = False,
    threads: int | None = None,
    export: Path | None = None,
    progress: bool = True,
    device: str = "cpu",
    stop_after: int | None = None,
    log: Callable[[str], None] | None = None,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    lora_targets: str | Sequence[str] | None = None,
    lora_norms: bool = True,
    keep_adapters: bool = False,
    grad_checkpointing: bool | None = None,
) -> dict[str, Any]:
    """Train ``train_towers`` of the ``init`` model (the rest frozen); export it and its sidecar.

    Writes ``out/checkpoint.pt`` as it goes (``resume`` continues from it), then
    ``out/<name>.safetensors`` (or ``export``), its sidecar (``sidecar_path``) and
    ``out/train_log.json``; returns the sidecar's object.

    ``lora_rank``: train low-rank adapters (``train.lora``) instead of every weight, on the
    trunk projections ``lora_targets`` names (None: all of them), with the towers' LayerNorms
    and biases unless ``lora_norms`` is False; they are merged into the export, or with
    ``keep_adapters`` written apart to ``out/<name>.adapters.safetensors`` (named in the
    sidecar; ``load_encoder`` merges them).
    ``grad_checkpointing``: None turns it on for big trunks (``BIG_TRUNK``). bf16 autocast is
    on when training on CUDA.
    """
    from encoders import load_encoder
    from encoders.adapters import merge_adapters
    from encoders.checkpoint import save_safetensors, sha256_file, state_dict_towers

    from .recipe import (
        ANCHORS,
        DEFAULT_ANCHORS,
        TrainConfig,
        anchor_rows,
        from_manifest,
        from_world,
        save_state_dict,
        unit_embeddings,
    )
    from .recipe import train as train_model

    t0 = time.perf_counter()
    towers = parse_towers(train_towers)
    if lora_rank < 0:
        raise ValueError(f"--lora-rank must be at least 1, got {lora_rank}")
    if lora_rank and reinit:
        raise ValueError(
            "--lora-rank with --reinit: adapters on a frozen random trunk cannot bind a "
            "tower; bind it with --reinit alone (every weight learns), then adapt it with LoRA"
        )
    if keep_adapters and not lora_rank:
        raise ValueError("--keep-adapters keeps LoRA adapters apart: it needs --lora-rank R")
    if (lora_targets is not None or not lora_norms) and not lora_rank:
        raise ValueError("--lora-targets and --no-lora-norms shape LoRA: they need --lora-rank R")
    targets = parse_targets(lora_targets) if lora_targets is not None else LORA_TARGETS
    if threads:
        torch.set_num_threads(threads)
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown --device {device!r}; accepted: cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    ref = resolve_init(init, config)
    assert ref.weights is not None and ref.sha256 is not None
    init_sd = _init_tensors(ref.weights)
    held = [m.value for m in state_dict_towers(init_sd)]
    absent = [t for t in towers if held and t not in held]
    if absent and not reinit:
        raise ValueError(
            f"--init {init} has no {absent[0]} tower to fine-tune (it holds "
            f"{', '.join(held)}); bind it anew with --reinit"
        )
    # Every tower of the init file, whether it holds them all or (open_clip) only some.
    model = load_encoder(ref, device="cpu", dtype="fp32").model
    dtype = _float_dtype(init_sd)
    if reinit:
        model = add_towers(model, absent, seed=seed)
        reinit_towers(model, towers, seed=seed)

    cfg = model.cfg
    if manifest is not None:
        # Only the columns stage 2 uses: the trained towers' inputs, and their anchors, which
        # are embedded as they are read (the frozen vision tower's output is all they give),
        # on the training device.
        model.to(dev)
        anchor_keys = {a for t in towers for a in ANCHORS.get(t, DEFAULT_ANCHORS)}
        data = from_manifest(
            manifest,
            cfg,
            keys=sorted({*towers, *anchor_keys}),
            progress=progress,
            embed=lambda key, x: unit_embeddings(model, key, x),
            embed_keys=sorted(anchor_keys),
        )
        source: dict[str, Any] = {
            "kind": "manifest",
            "path": str(manifest),
            "sha256": sha256_file(manifest),
        }
    else:
        data = from_world(world, cfg, seed=world_seed, progress=progress)
        source = {"kind": "demo world", "n": world, "seed": world_seed}
    for m in towers:
        if not len(anchor_rows(m, data)):
            names = " or ".join(ANCHOR_NAMES[a] for a in ANCHORS.get(m, DEFAULT_ANCHORS))
            raise ValueError(
                f"the training data has no ({names}, {m}) pairs to train the {m} tower on"
            )
    identity = ref.identity + ("+reinit" if reinit else "")
    tc = TrainConfig(
        preset=ref.config_name,
        stage1_steps=0,
        stage2_steps=steps,
        batch_size=batch_size,
        lr=lr,
        stage2_lr=lr,
        seed=seed,
        checkpoint_every=checkpoint_every,
        modalities=towers,
        init=identity,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=targets,
        lora_norms=lora_norms,
    )
    if grad_checkpointing is None:
        grad_checkpointing = any(
            sum(p.numel() for p in model.modality_trunks[m].parameters()) >= BIG_TRUNK
            for m in towers
        )
    result = train_model(
        data,
        tc,
        out,
        resume=resume,
        progress=progress,
        log=log,
        device=str(dev),
        init=model,
        stop_after=stop_after,
        grad_checkpointing=grad_checkpointing,
        autocast=dev.type == "cuda",
    )
    name = Path(ref.config_name).stem if ref.config_name.endswith(".json") else ref.config_name
    target = export or (Path(out) / f"{name}.safetensors")
    changed = [m for m in model.modalities if m.value in towers]
    card: dict[str, Any] = {
        "config": cfg.to_dict(),
        "init": {
            "name": ref.name,
            "weights": str(ref.weights),
            "sha256": ref.sha256,
            "licence": ref.licence,
        },
        "init_sha256": ref.sha256,
        "towers_changed": [m.value for m in changed],
        "towers_frozen": [m.value for m in model.modalities if m.value not in towers],
        "reinit": reinit,
        "data_source": source,
        "steps": 0,
        "licence": ref.licence,
        "licence_url": ref.licence_url,
    }
    card["steps"] = max((len(v) for k, v in result.losses.items() if k != "stage1"), default=0)
    card["lora_rank"] = lora_rank
    adapters: dict[str, Tensor] = {}
    if lora_rank:
        from .lora import count_trainable, split_adapters

        card["lora_alpha"] = lora_alpha
        card["lora_targets"] = list(targets)
        card["lora_norms"] = lora_norms
        counts = count_trainable(result.model, towers, norms=lora_norms)
        card["trainable_params"] = counts.to_dict()
        sd, adapters = split_adapters(result.model.state_dict())
        if not keep_adapters:
            sd = merge_adapters(sd, adapters, lora_alpha / lora_rank)
    else:
        sd = result.model.state_dict()
        n = sum(p.numel() for k, p in sd.items() if _trained_key(k, towers))
        card["trainable_params"] = {"trainable": n, "full_finetune": n, "fraction": 1.0}
    if keep_adapters:
        apart = target.with_name(f"{target.stem}.adapters.safetensors")
        meta = {"scale": repr(lora_alpha / lora_rank), "rank": str(lora_rank)}
        meta["alpha"] = repr(lora_alpha)
        meta["targets"] = ",".join(targets)
        save_safetensors({k: v.detach().float().cpu() for k, v in adapters.items()}, apart, meta)
        card["adapters"] = apart.name
        card["adapters_sha256"] = sha256_file(apart)
    save_state_dict(sd, cfg, target, dtype=dtype, metadata={"init": json.dumps(card)})
    card["weights"] = target.name
    card["sha256"] = sha256_file(target)
    # Per tower, the hash of its tensors (what an index's per-tower fingerprint is made of):
    # read from here, the exported file need not be hashed again by every command.
    card["towers"] = tower_hashes(target, card["sha256"])
    sidecar_path(target).write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    train_log = {
        "train_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(tc).items()},
        "device": str(dev),
        "seconds_total": round(time.perf_counter() - t0, 1),
        "loss_first": {k: v[:10] for k, v in result.losses.items()},
        "loss_last": {k: v[-10:] for k, v in result.losses.items()},
        "weights": str(target),
    }
    (Path(out) / "train_log.json").write_text(json.dumps(train_log, indent=1), encoding="utf-8")
    return {**card, "path": str(target), "seconds_total": train_log["seconds_total"]}


def _trained_key(key: str, towers: Sequence[str]) -> bool:
    """A key a full fine-tune of ``towers`` trains (stem, trunk, head; not the logit scale)."""
    return is_tower_key(key, towers) and not key.startswith("modality_postprocessors.")


def _init_tensors(path: Path) -> dict[str, Tensor]:
    from encoders.checkpoint import read_state_dict, remap_imagebind_keys

    return remap_imagebind_keys(read_state_dict(path))


def _float_dtype(sd: dict[str, Tensor]) -> torch.dtype:
    """The dtype of the init file's floating tensors: exporting in it keeps frozen ones exact."""
    dtypes = {t.dtype for t in sd.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        return dtypes.pop()
    return torch.float32  # mixed: fp32 holds every one of them exactly
