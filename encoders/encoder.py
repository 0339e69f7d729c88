"""``load_encoder`` and ``Encoder``: the model, loaded once, behind a small interface."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .adapters import apply_card_adapters
from .checkpoint import (
    check_state_dict,
    read_state_dict,
    remap_imagebind_keys,
    select_modalities,
    state_dict_towers,
)
from .config import ModelConfig, PreprocessConfig
from .dtype import choose_dtype, offered_towers, quantize_int8
from .errors import CheckpointError
from .inputs import Item, preprocess
from .modality import TOWERS, Modality
from .model import ImageBind, init_weights
from .models import ModelRef, file_sha256, resolve_model
from .transforms.text import trim_to_longest

log = logging.getLogger(__name__)


class Encoder:
    """An ImageBind model in eval/inference mode on one device and dtype.

    ``forward`` returns the official outputs (logit-scaled, for parity); ``embed`` returns
    L2-normalised float32 vectors, the only form the index and the service use. ``ref`` says
    which model it is (weights file, sha256, name, licence): nobody needs to work it out again.
    ``precision`` names the dtype it runs in (``float32``, ``bfloat16``, ``float16``, ``int8``:
    ``encoders.dtype``); ``tower_dtypes`` the input dtype of each tower where it differs from
    ``dtype`` (a tower not offered in a reduced dtype runs in fp32), ``dtype_note`` says why.
    """

    pin_memory: bool = True  # CUDA: host->device copies from page-locked memory

    def __init__(
        self,
        model: ImageBind,
        device: torch.device,
        dtype: torch.dtype,
        ref: ModelRef,
        precision: str | None = None,
        tower_dtypes: Mapping[Modality, torch.dtype] | None = None,
        dtype_note: str = "",
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.device = device
        self.dtype = dtype
        self.ref = ref
        self.precision = precision or str(dtype).removeprefix("torch.")
        self.tower_dtypes = dict(tower_dtypes or {})
        self.dtype_note = dtype_note

    @property
    def checkpoint_sha256(self) -> str | None:
        """sha256 of the loaded weights file (None for random weights)."""
        return self.ref.sha256

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    @property
    def preprocess_cfg(self) -> PreprocessConfig:
        """The preprocessing constants these weights expect."""
        return self.model.cfg.preprocess

    @property
    def dim(self) -> int:
        return self.model.cfg.embed_dim

    @property
    def modalities(self) -> tuple[Modality, ...]:
        """Input modalities this encoder can embed (video whenever vision is loaded)."""
        towers = self.model.modalities
        extra = (Modality.VIDEO,) if Modality.VISION in towers else ()
        return towers + extra

    def _prepare(self, modality: Modality, x: Tensor | np.ndarray) -> Tensor:
        t = torch.as_tensor(x)
        expected = _expected_ndims(modality)
        if t.ndim not in expected:
            raise ValueError(
                f"{modality.value} input must have {' or '.join(map(str, expected))} dims, "
                f"got shape {tuple(t.shape)}"
            )
        dtype = (
            torch.long
            if modality is Modality.TEXT
            else self.tower_dtypes.get(modality.tower, self.dtype)
        )
        if self.pin_memory and self.device.type == "cuda" and t.device.type == "cpu":
            # Copy from page-locked memory: a DMA that does not block the host (the caching
            # host allocator keeps the buffer alive until the copy has run). The cast runs on
            # the GPU, where it is nearly free; on the host it would cost more than it saves.
            return t.pin_memory().to(self.device, non_blocking=True).to(dtype)
        return t.to(self.device, dtype)

    def forward(self, inputs: dict[str | Modality, Tensor | np.ndarray]) -> dict[str, Tensor]:
        """Exactly the official ``ImageBindModel.forward``: {modality: (N, D)} scaled outputs."""
        out: dict[str, Tensor] = {}
        with torch.inference_mode():
            for key, x in inputs.items():
                m = Modality.parse(key)
                out[str(key)] = self.model.embed_one(m, self._prepare(m, x)).float()
        return out

    __call__ = forward

    def embed(self, modality: Modality | str, x: Tensor | np.ndarray) -> np.ndarray:
        """L2-normalised float32 (N, D) embeddings, without logit scale.

        Clip inputs (audio (B, S, 1, F, T); video (B, S, 3, T, H, W)) give one vector per item,
        the normalised mean of its clip vectors. Text token ids (B, L) are trimmed to the
        batch's longest text first (``trim_to_longest``: exact), so callers need not.
        """
        m = Modality.parse(modality)
        if m is Modality.TEXT:
            t = torch.as_tensor(x)
            x = trim_to_longest(t) if t.ndim == 2 else t  # other shapes: _prepare says why
        with torch.inference_mode():
            y = self.model.embed_one(m, self._prepare(m, x), scaled=False)
            y = torch.nn.functional.normalize(y.float(), dim=-1)
        return y.cpu().numpy()

    def preprocess(
        self,
        modality: Modality | str,
        items: Sequence[Item] | str,
        official: bool = False,
        **options: Any,
    ) -> Tensor:
        """Files, bytes or strings -> the batch this model takes (see ``encoders.inputs``)."""
        return preprocess(modality, items, self.preprocess_cfg, official=official, **options)

    def embed_items(
        self,
        modality: Modality | str,
        items: Sequence[Item] | str,
        official: bool = False,
        batch_size: int = 16,
        **options: Any,
    ) -> np.ndarray:
        """Files, bytes or strings -> (N, D) float32 L2-normalised embeddings, in input order."""
        m = Modality.parse(modality)
        if isinstance(items, str | bytes | Path):
            items = [items]
        out = []
        for start in range(0, len(items), batch_size):
            x = self.preprocess(m, items[start : start + batch_size], official, **options)
            out.append(self.embed(m, x))  # text is trimmed inside embed
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(out)


def _expected_ndims(m: Modality) -> tuple[int, ...]:
    return {
        Modality.VISION: (4, 6),  # images (B,3,H,W) or clips (B,S,3,T,H,W)
        Modality.VIDEO: (6,),
        Modality.TEXT: (2,),
        Modality.AUDIO: (4, 5),  # (B,1,F,T) or (B,S,1,F,T)
        Modality.DEPTH: (4, 5),
        Modality.THERMAL: (4, 5),
        Modality.IMU: (3, 4),
    }[m]


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it (fp16 on older ones) and on CPUs with native bf16, else fp32.

    ``encoders.dtype.choose_dtype`` decides (``$BINDSEARCH_DTYPE`` overrides it).
    """
    return choose_dtype(None, device).torch_dtype


def load_encoder(
    checkpoint: str | Path | ModelRef | None = None,
    config: str | Path | ModelConfig | dict[str, Any] = "imagebind_huge",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    modalities: Iterable[Modality | str] | None = None,
    sha256: str | None = None,
    seed: int | None = 0,
) -> Encoder:
    """Build an encoder and load its weights once.

    The model is built on the ``meta`` device, so no memory is allocated until the checkpoint's
    tensors are assigned (strictly: every key of the requested towers, with the official
    names and shapes). Only the towers of ``modalities`` are built and loaded. A checkpoint
    that holds only some towers (``openclip_vit_h14_bind`` before ``train --init`` binds the
    rest) loads those when ``modalities`` is None; asking it for another tower is a one-line
    ``CheckpointError`` that says how to bind it. Without a checkpoint the weights are random
    (seeded): for tests and benchmarks.

    Args:
        checkpoint: a ``ModelRef`` (``resolve_model``; ``config`` and ``seed`` are then
            ignored), or a ``.pth`` (read with ``weights_only=True``) or ``.safetensors``
            (mmap) file, or None for random weights.
        config: a preset name, a ModelConfig, a dict, or a JSON file (ours or the official
            constructor kwargs).
        dtype: a torch dtype or a name (``fp32``, ``bf16``, ``fp16``, ``int8``, ``auto``); None
            (the default) is ``$BINDSEARCH_DTYPE``, else ``auto``: bf16 on GPUs that support it
            (fp16 on older ones), bf16 on CPUs with native bf16 matmul (``avx512_bf16``,
            ``amx_bf16``, Arm ``bf16``), fp32 on other CPUs. ``int8`` (CPU only) quantises the
            trunks' linear layers. A tower not offered in the dtype (``encoders.dtype.OFFERED``)
            runs in fp32, with a note in ``Encoder.dtype_note`` and the log.
        sha256: when given, the checkpoint file is checked against it before loading.
    """
    if isinstance(checkpoint, ModelRef):
        ref = checkpoint
        seed = ref.seed
    elif checkpoint is None:
        ref = resolve_model(config, random_weights=True, seed=seed or 0)
    else:
        ref = resolve_model(config, checkpoint)
    if ref.weights is not None:
        # Memoised per (file, size, mtime): costs nothing unless the file changed since.
        got = file_sha256(ref.weights)
        want = ref.sha256 if sha256 is None else sha256.lower()
        if got != want:
            raise CheckpointError(
                f"checkpoint {ref.weights} has sha256 {got}, expected {want}: "
                "the file is corrupt, truncated, replaced or not the one named"
            )
    cfg = ref.config
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    choice = choose_dtype(dtype, dev)  # before the load: a bad name fails fast
    wanted = (
        TOWERS
        if modalities is None
        else tuple(dict.fromkeys(Modality.parse(m).tower for m in modalities))
    )
    sd = None if ref.weights is None else remap_imagebind_keys(read_state_dict(ref.weights))
    if sd is not None:
        # Adapters kept beside the weights (``train --init --keep-adapters``): merged now.
        assert ref.weights is not None
        sd = apply_card_adapters(sd, ref.weights, ref.sha256)
        wanted = _towers_to_load(ref, sd, wanted, modalities is None)
    model = ImageBind(cfg, wanted, device="meta")
    expected = {k: v.shape for k, v in model.state_dict().items()}

    if sd is None:
        model = model.to_empty(device="cpu")
        init_weights(model, seed=seed)
    else:
        sd = select_modalities(sd, model.modalities)
        check_state_dict(sd, expected)
        # assign=True: the checkpoint's tensors become the parameters (no second copy).
        model.load_state_dict(sd, strict=True, assign=True)
    reduced, note = offered_towers(choice, model.modalities)
    if note:
        log.info("%s", note)
    dt = choice.torch_dtype
    whole = dt if reduced == set(model.modalities) else torch.float32
    model = model.to(device=dev, dtype=whole)
    tower_dtypes = {}
    for m in model.modalities:
        if m not in reduced:
            tower_dtypes[m] = torch.float32
        elif whole != dt:
            for part in _tower_parts(model, m):
                part.to(dtype=dt)
            tower_dtypes[m] = dt
        if m in reduced and choice.quantized:
            model.modality_trunks[m.value] = quantize_int8(model.modality_trunks[m.value])
    return Encoder(model, dev, dt, ref, choice.name, tower_dtypes, note)


def _towers_to_load(
    ref: ModelRef, sd: Mapping[str, Tensor], wanted: tuple[Modality, ...], every: bool
) -> tuple[Modality, ...]:
    """The towers to build: ``wanted``, or (``every``) those the checkpoint has.

    A tower the checkpoint has no key of is not a damaged checkpoint but one not bound yet:
    the error says how to bind it. A checkpoint with no tower at all is left to
    ``select_modalities`` (foreign keys) and ``check_state_dict`` (missing keys).
    """
    present = state_dict_towers(sd)
    if not present:
        return wanted
    if every:
        return present
    absent = [m for m in wanted if m not in present]
    if not absent:
        return wanted
    m = absent[0]
    held = ", ".join(t.value for t in present)
    if ref.source in ("downloaded", "shipped"):
        what, init = ref.config_name, ref.config_name
    else:
        what, init = str(ref.weights), f"{ref.weights} --config {ref.config_name}"
    if m in (Modality.VISION, Modality.TEXT):
        raise CheckpointError(f"{what} has no {m.value} tower (it holds {held})")
    raise CheckpointError(
        f"the {m.value} tower of {what} is not bound yet (it holds {held}): bind it with "
        f"`bindsearch train --init {init} --train-towers {m.value} --reinit ...`"
    )


def _tower_parts(model: ImageBind, m: Modality) -> list[torch.nn.Module]:
    """The modules of one tower: stem, trunk, head and postprocessor."""
    dicts = (
        model.modality_preprocessors,
        model.modality_trunks,
        model.modality_heads,
        model.modality_postprocessors,
    )
    return [d[m.value] for d in dicts if m.value in d]
