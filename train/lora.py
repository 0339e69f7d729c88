"""LoRA for ``bindsearch train --init --lora-rank R``: low-rank adapters on a tower's trunk.

Each of the trunk's projections named by ``--lora-targets`` (``TARGETS``: the attention's packed
q/k/v ``in_proj_weight`` (3D, D) as ``qkv``, its ``out_proj``, the MLP's ``fc1`` and ``fc2``; all
four by default) learns as ``W + (alpha / r) * B @ A`` with ``W`` frozen, ``A`` (r, in) random
and ``B`` (out, r) zero (training starts from the init model exactly). The adapter is a
``torch.nn.utils.parametrize`` parametrization of the weight, so the model's code does not
change; the model's state dict then holds ``...parametrizations.<name>.original`` and the
adapters, which is what a checkpoint saves and a resume loads back.

With adapters, the tower's base weights are frozen except its LayerNorms and biases (trunk
biases, the attention's learned ``bias_k``/``bias_v``, stem and head LayerNorms): O(width)
per block, they re-centre and re-scale activations the adapters shift, and cost under 2 % of
a full fine-tune on every preset (common practice: LoRA with the norms, BitFit). With
``norms=False`` (``--no-lora-norms``) they stay frozen too and only the adapters learn, as in
the LoRA paper. The stem's patch projection, positional embedding and class token and the
head's projection stay frozen: each is a full matrix that alone would weigh 4-8 % of the demo
tower.

``split_adapters`` turns such a state dict back into the plain layout plus the adapters
(``encoders.adapters`` format); ``encoders.adapters.merge_adapters`` merges them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from encoders.adapters import LORA_A, LORA_B, merge_adapters
from encoders.model import Attention, ImageBind, Mlp

__all__ = [
    "LORA_TARGETS",
    "TARGETS",
    "LoRA",
    "LoRACounts",
    "add_adapters",
    "count_trainable",
    "full_parts",
    "merged_state_dict",
    "parse_targets",
    "set_lora_trainable",
    "split_adapters",
]

# The trunk's projections that can get adapters, by their ``--lora-targets`` name:
# (module type, attribute path of the weight). All of them by default.
TARGETS: dict[str, tuple[type[nn.Module], str]] = {
    "qkv": (Attention, "in_proj_weight"),
    "out_proj": (Attention, "out_proj.weight"),
    "fc1": (Mlp, "fc1.weight"),
    "fc2": (Mlp, "fc2.weight"),
}
LORA_TARGETS: tuple[str, ...] = tuple(TARGETS)
_PARAM = ".parametrizations."
_ORIGINAL = ".original"


def parse_targets(spec: str | Iterable[str]) -> tuple[str, ...]:
    """``"qkv,fc1"`` (or its parts) -> the targets in ``TARGETS`` order; unknown ones refused."""
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [t for t in names if t]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        what = f"unknown --lora-targets {', '.join(unknown)}" if unknown else "no --lora-targets"
        raise ValueError(f"{what}; accepted: a comma list of {', '.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in names)


class LoRA(nn.Module):
    """The parametrization ``W -> W + scale * B @ A`` (A (r, in) random, B (out, r) zero)."""

    def __init__(
        self,
        out: int,
        inp: int,
        rank: int,
        alpha: float,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.scale = alpha / rank
        bound = 1.0 / math.sqrt(inp)  # nn.Linear's default (kaiming uniform, a = sqrt(5))
        a = (torch.rand(rank, inp, generator=generator) * 2 - 1) * bound
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(out, rank, device=device))

    def forward(self, w: Tensor) -> Tensor:
        delta = self.lora_B @ self.lora_A  # (out, r) @ (r, in) -> (out, in)
        return w + self.scale * delta.to(w.dtype)


def add_adapters(
    model: ImageBind,
    towers: Sequence[str],
    rank: int,
    alpha: float,
    seed: int = 0,
    targets: Sequence[str] = LORA_TARGETS,
) -> int:
    """Give each ``targets`` weight of ``towers``' trunks a ``LoRA``; returns how many."""
    if rank < 1:
        raise ValueError(f"--lora-rank must be at least 1, got {rank}")
    kinds = [TARGETS[t] for t in parse_targets(targets)]
    g = torch.Generator().manual_seed(seed)
    n = 0
    for m in towers:
        for mod in model.modality_trunks[m].modules():
            for kind, path in kinds:
                if not isinstance(mod, kind):
                    continue
                owner, name = _resolve(mod, path)
                w = getattr(owner, name)
                lora = LoRA(w.shape[0], w.shape[1], rank, alpha, g, device=w.device)
                parametrize.register_parametrization(owner, name, lora)
                n += 1
    return n


def full_parts(model: ImageBind, towers: Sequence[str]) -> list[str]:
    """Names of the parameters of ``towers`` that train in full next to the adapters."""
    names = []
    for prefix in ("modality_preprocessors", "modality_trunks", "modality_heads"):
        for m in towers:
            tower = getattr(model, prefix)[m]
            norms = {
                f"{n}.{p}" if n else p
                for n, mod in tower.named_modules()
                if isinstance(mod, nn.LayerNorm)
                for p, _ in mod.named_parameters(recurse=False)
            }
            for n, _ in tower.named_parameters():
                if _ORIGINAL in n or ".lora_" in n:
                    continue
                leaf = n.rsplit(".", 1)[-1]
                if n in norms or leaf in ("bias", "in_proj_bias", "bias_k", "bias_v"):
                    names.append(f"{prefix}.{m}.{n}")
    return names


def set_lora_trainable(model: ImageBind, towers: Sequence[str], norms: bool = True) -> None:
    """Freeze all but the adapters of ``towers`` (and, with ``norms``, their ``full_parts``)."""
    model.requires_grad_(False)
    keep = set(full_parts(model, towers)) if norms else set()
    for n, p in model.named_parameters():
        if n in keep or (n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") and _in(n, towers)):
            p.requires_grad_(True)


@dataclass(frozen=True)
class LoRACounts:
    """Trainable parameters of a LoRA run against a full fine-tune of the same towers."""

    adapters: int
    full_parts: int
    full_finetune: int

    @property
    def trainable(self) -> int:
        return self.adapters + self.full_parts

    @property
    def fraction(self) -> float:
        return self.trainable / self.full_finetune

    def to_dict(self) -> dict[str, int | float]:
        return {
            "adapters": self.adapters,
            "full_parts": self.full_parts,
            "trainable": self.trainable,
            "full_finetune": self.full_finetune,
            "fraction": round(self.fraction, 4),
        }


def count_trainable(model: ImageBind, towers: Sequence[str], norms: bool = True) -> LoRACounts:
    """Count adapters, fully trained parts, and what a full fine-tune of ``towers`` trains."""
    adapters = full = base = 0
    full_names = set(full_parts(model, towers)) if norms else set()
    for n, p in model.named_parameters():
        if not _in(n, towers) or n.split(".")[0] == "modality_postprocessors":
            continue
        if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
            adapters += p.numel()
            continue
        base += p.numel()
        if n in full_names:
            full += p.numel()
    return LoRACounts(adapters, full, base)


def split_adapters(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A LoRA model's state dict -> (the plain layout's base weights, the adapters by weight)."""
    base: dict[str, Tensor] = {}
    adapters: dict[str, Tensor] = {}
    for k, v in sd.items():
        if _PARAM not in k:
            base[k] = v
            continue
        owner, rest = k.split(_PARAM, 1)
        name, what = rest.split(".", 1)
        target = f"{owner}.{name}"
        if what == "original":
            base[target] = v
        elif what == "0.lora_A":
            adapters[target + LORA_A] = v
        elif what == "0.lora_B":
            adapters[target + LORA_B] = v
        else:
            raise ValueError(f"unexpected parametrization key {k}")
    return base, adapters


def merged_state_dict(model: ImageBind, scale: float) -> dict[str, Tensor]:
    """The plain-layout state dict of a LoRA model with its adapters merged in."""
    base, adapters = split_adapters(model.state_dict())
    return merge_adapters(base, adapters, scale)


def _resolve(mod: nn.Module, path: str) -> tuple[nn.Module, str]:
    *owners, name = path.split(".")
    for o in owners:
        mod = getattr(mod, o)
    return mod, name


def _in(name: str, towers: Iterable[str]) -> bool:
    parts = name.split(".")
    return len(parts) > 1 and parts[1] in towers
