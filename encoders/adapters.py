"""Low-rank adapters kept beside a weights file, merged into the weights at load.

``bindsearch train --init ... --lora-rank R --keep-adapters`` writes the init's weights (their
fully trained small parts updated) and, apart, ``OUT/<name>.adapters.safetensors``, named in
the weights' card (``encoders.models.weights_card``) under ``adapters`` with its
``adapters_sha256``. For a weight ``K`` (out, in), e.g.
``modality_trunks.audio.blocks.0.attn.in_proj_weight``, the file holds ``K.lora_A`` (r, in) and
``K.lora_B`` (out, r); its metadata holds the ``scale`` (alpha / r). The adapted weight is
``W + scale * B @ A``: ``merge_weight`` is the one definition, used by the training export
(merged) and by ``load_encoder`` (kept apart), so both give the same weights bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from .errors import CheckpointError

__all__ = ["LORA_A", "LORA_B", "apply_card_adapters", "merge_adapters", "merge_weight"]

LORA_A, LORA_B = ".lora_A", ".lora_B"


def merge_weight(w: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``w + scale * b @ a``, computed in fp32 and returned in ``w``'s dtype."""
    delta = b.detach().float() @ a.detach().float()  # (out, r) @ (r, in) -> (out, in)
    return (w.detach().float() + scale * delta.to(w.device)).to(w.dtype)


def merge_adapters(
    sd: Mapping[str, Tensor], adapters: Mapping[str, Tensor], scale: float
) -> dict[str, Tensor]:
    """A state dict with every adapted weight of ``adapters`` merged in (others untouched)."""
    out = dict(sd)
    for key in adapters:
        if not key.endswith(LORA_A):
            continue
        target = key[: -len(LORA_A)]
        b = adapters.get(target + LORA_B)
        if target not in sd or b is None:
            raise CheckpointError(f"adapter {target} has no weight or no lora_B to merge with")
        w, a = sd[target], adapters[key]
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"adapter {target}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit "
                f"the weight {tuple(w.shape)}"
            )
        out[target] = merge_weight(w, a, b, scale)
    return out


def apply_card_adapters(
    sd: Mapping[str, Tensor], weights: str | Path, sha256: str | None
) -> dict[str, Tensor]:
    """``sd`` (read from ``weights``) with the adapters its card names merged in, if any.

    The adapters file must sit beside the weights and match the card's ``adapters_sha256``;
    a missing or different file is a one-line ``CheckpointError``.
    """
    from safetensors import safe_open

    from .checkpoint import sha256_file
    from .models import weights_card

    card = weights_card(weights, sha256)
    name = card.get("adapters") if card else None
    if not card or not isinstance(name, str):
        return dict(sd)
    path = Path(weights).parent / name
    if not path.is_file():
        raise CheckpointError(
            f"the card of {weights} names adapters {name}, which are not beside it at {path}"
        )
    if sha256_file(path) != card.get("adapters_sha256"):
        raise CheckpointError(
            f"adapters {path} are not the ones the card of {weights} names (sha256 differs)"
        )
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        adapters = {k: f.get_tensor(k) for k in f.keys()}
    try:
        scale = float(meta["scale"])
    except (KeyError, ValueError):
        raise CheckpointError(f"adapters {path} do not say their scale (metadata)") from None
    return merge_adapters(sd, adapters, scale)
