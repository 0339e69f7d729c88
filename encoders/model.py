"""The ImageBind architecture, written for reading and for speed.

Module and parameter names follow the official state-dict layout
(``modality_preprocessors.<m>``, ``modality_trunks.<m>``, ``modality_heads.<m>``,
``modality_postprocessors.<m>``), so the official checkpoint loads strictly with no renaming.
Each tower is: stem (patch/linear embedding + class token + positional embedding) -> trunk
(pre-norm transformer blocks) -> head (LayerNorm, pick one token, Linear) -> postprocessing
(L2 normalisation, then a clamped logit scale for every modality but vision).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .modality import TOWERS, Modality

LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)
Factory = dict[str, Any]  # {"device": ..., "dtype": ...}


# ----------------------------------------------------------------------------- trunk


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (``nn.MultiheadAttention`` layout).

    ``bias_kv`` adds one learned key/value position that every query attends to. The fused path
    is ``scaled_dot_product_attention``; ``fused = False`` selects a plain eager softmax path
    (a reference for benchmarks and debugging).
    """

    fused: bool = True
    bias_k: nn.Parameter | None
    bias_v: nn.Parameter | None

    def __init__(self, dim: int, heads: int, bias_kv: bool = False, **fk: Any) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim, **fk))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim, **fk))
        if bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, dim, **fk))
            self.bias_v = nn.Parameter(torch.empty(1, 1, dim, **fk))
        else:
            self.bias_k = self.bias_v = None
        self.out_proj = nn.Linear(dim, dim, **fk)
        # A replacement qkv projection (int8: ``encoders.dtype.quantize_int8``), else the weights.
        self.in_proj: nn.Module | None = None

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        B, L, D = x.shape
        H = self.heads
        hs = D // H
        if self.in_proj is not None:
            qkv = self.in_proj(x)  # (B, L, 3D)
        else:
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3D)
        q, k, v = qkv.view(B, L, 3, H, hs).permute(2, 0, 3, 1, 4)  # each (B, H, L, hs)
        if self.bias_k is not None and self.bias_v is not None:
            # One extra key/value position, shared by all queries: (B, H, L+1, hs).
            k = torch.cat([k, self.bias_k.view(1, H, 1, hs).expand(B, H, 1, hs)], dim=2)
            v = torch.cat([v, self.bias_v.view(1, H, 1, hs).expand(B, H, 1, hs)], dim=2)
            if mask is not None:
                mask = F.pad(mask, (0, 1))  # the extra position is never masked
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, H, L, L')
            if mask is not None:
                att = att + mask
            y = att.softmax(dim=-1) @ v
        y = y.transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        out: Tensor = self.out_proj(y)
        return out


class Mlp(nn.Module):
    def __init__(
        self, dim: int, hidden: int, act_layer: Callable[[], nn.Module] = nn.GELU, **fk: Any
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, **fk)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim, **fk)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc2(self.act(self.fc1(x)))
        return out


class DropPath(nn.Module):
    """Stochastic depth per sample (training only)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: int = 4,
        bias_kv: bool = False,
        drop_path: float = 0.0,
        norm_layer: Callable[..., nn.Module] = LayerNorm6,
        **fk: Any,
    ) -> None:
        super().__init__()
        self.attn = Attention(dim, heads, bias_kv=bias_kv, **fk)
        self.norm_1 = norm_layer(dim, **fk)
        self.mlp = Mlp(dim, mlp_ratio * dim, **fk)
        self.norm_2 = norm_layer(dim, **fk)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm_1(x), mask))
        x = x + self.drop_path(self.mlp(self.norm_2(x)))
        return x


class Trunk(nn.Module):
    """A stack of blocks, with the vision tower's extra LayerNorm in front.

    ``grad_checkpointing`` (training only, timm's switch): each block's activations are
    recomputed in the backward pass instead of kept (``torch.utils.checkpoint``), so a huge
    tower trains on one GPU; the loss and gradients are the same.
    """

    grad_checkpointing: bool = False

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: int = 4,
        pre_norm: bool = False,
        bias_kv: bool = False,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        **fk: Any,
    ) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=norm_eps)
        if pre_norm:
            self.pre_transformer_layer = nn.Sequential(norm(dim, **fk))
        else:
            self.pre_transformer_layer = nn.Sequential()
        # Drop path grows linearly over depth (training only).
        rates = torch.linspace(0, drop_path, depth).tolist() if depth > 1 else [drop_path]
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, bias_kv=bias_kv, drop_path=r, norm_layer=norm, **fk)
            for r in rates
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.pre_transformer_layer(x)
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x


# ----------------------------------------------------------------------------- stems


def _patchify(x: Tensor, kernel: tuple[int, ...]) -> Tensor:
    """Non-overlapping patches, flattened: (B, C, *S) -> (B, N, C * prod(kernel)).

    Patch order is row-major over the grid and features are (C, *kernel), exactly the order of
    a convolution's flattened output and flattened weight. Trailing pixels that do not fill a
    patch are dropped, as a convolution with stride = kernel does.
    """
    B, C, *S = x.shape
    grid = [s // k for s, k in zip(S, kernel, strict=True)]
    crop = tuple(slice(0, g * k) for g, k in zip(grid, kernel, strict=True))
    x = x[(slice(None), slice(None), *crop)]
    split = [d for g, k in zip(grid, kernel, strict=True) for d in (g, k)]
    x = x.reshape(B, C, *split)  # (B, C, g0, k0, g1, k1, ...)
    n = len(kernel)
    order = [0, *range(2, 2 + 2 * n, 2), 1, *range(3, 3 + 2 * n, 2)]
    x = x.permute(order)  # (B, g0, g1, ..., C, k0, k1, ...)
    return x.reshape(B, math.prod(grid), -1)


class PatchProj(nn.Module):
    """A bias-free convolution whose kernel is a patch, computed as one matmul over patches.

    The weight has the layout of ``nn.Conv2d``/``nn.Conv3d``, so checkpoints load unchanged.
    As a plain GEMM it runs at matmul speed on CPU and stays true fp32 on GPU (cuDNN
    convolutions default to TF32, which would cost parity). Returns tokens (B, N, D).
    """

    def __init__(
        self, in_ch: int, dim: int, kernel: tuple[int, ...], stride: tuple[int, ...], **fk: Any
    ) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.weight = nn.Parameter(torch.empty(dim, in_ch, *kernel, **fk))

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel == self.stride:
            patches = _patchify(x, self.kernel)  # (B, N, C*prod(k))
        elif len(self.kernel) == 2:  # overlapping patches (audio): im2col
            patches = F.unfold(x, self.kernel, stride=self.stride).transpose(1, 2)
        else:
            raise ValueError("overlapping 3-D patches are not supported")
        return F.linear(patches, self.weight.flatten(1))  # (B, N, D)


class RepeatFrames(nn.Module):
    """Turn a still image (B, C, H, W) into a clip (B, C, T, H, W) by repeating it in time."""

    def __init__(self, frames: int) -> None:
        super().__init__()
        self.frames = frames

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)  # (B, C, 1, H, W)
        if x.shape[2] == 1:
            x = x.expand(-1, -1, self.frames, -1, -1)
        return x


class ClipPatchProj(nn.Sequential):
    """Vision patch projection: [RepeatFrames, PatchProj] (keys ``proj.1.weight``).

    A still image repeated over the clip's frames meets the same pixels at every time step of
    the kernel, so when one temporal patch spans the whole clip the kernel is summed over time
    and applied to the image once: the same result at half the cost, with no repeated copy.
    """

    def forward(self, x: Tensor) -> Tensor:
        repeat: RepeatFrames = self[0]  # type: ignore[assignment]
        proj: PatchProj = self[1]  # type: ignore[assignment]
        kt, kh, kw = proj.kernel
        if x.ndim == 4 and repeat.frames == kt and proj.kernel == proj.stride:
            w = proj.weight.sum(dim=2)  # (D, C, kh, kw)
            return F.linear(_patchify(x, (kh, kw)), w.flatten(1))
        out: Tensor = proj(repeat(x))
        return out


class PatchEmbed(nn.Module):
    """A projection (conv or linear), flattened to tokens, with an optional LayerNorm."""

    def __init__(self, proj: nn.Module, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.proj = proj
        self.norm_layer = norm

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        if x.ndim > 3:
            x = x.flatten(2).transpose(1, 2)  # (B, D, *grid) -> (B, N, D)
        if self.norm_layer is not None:
            x = self.norm_layer(x)
        return x


class PosEmbed(nn.Module):
    def __init__(self, n: int, dim: int, **fk: Any) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.empty(1, n, dim, **fk))


class PatchStem(nn.Module):
    """Patches -> tokens, prepend a class token, add the learned positional embedding.

    ``stem_name`` is the attribute that holds the patch embedding (``rgbt_stem`` for vision,
    audio and thermal; ``depth_stem`` for depth), as in the official state dict.
    """

    def __init__(
        self, patch: PatchEmbed, num_patches: int, dim: int, stem_name: str = "rgbt_stem", **fk: Any
    ) -> None:
        super().__init__()
        self.stem_name = stem_name
        self.add_module(stem_name, patch)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim, **fk))
        self.pos_embedding_helper = PosEmbed(num_patches + 1, dim, **fk)

    def forward(self, x: Tensor) -> Tensor:
        tokens = getattr(self, self.stem_name)(x)  # (B, N, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)  # (B, 1+N, D)
        return tokens + self.pos_embedding_helper.pos_embed


class IMUStem(nn.Module):
    """(B, C, S) trace -> windows of ``window`` samples, channel-major -> Linear -> LayerNorm."""

    def __init__(self, channels: int, samples: int, window: int, dim: int, **fk: Any) -> None:
        super().__init__()
        self.window = window
        n = samples // window
        self.imu_stem = PatchEmbed(
            nn.Linear(channels * window, dim, bias=False, **fk), nn.LayerNorm(dim, **fk)
        )
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim, **fk))
        self.pos_embed = nn.Parameter(torch.empty(1, n + 1, dim, **fk))

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        w = x.unfold(-1, self.window, self.window)  # (B, C, N, window)
        w = w.permute(0, 2, 1, 3).reshape(B, w.shape[2], -1)  # (B, N, C*window)
        tokens = self.imu_stem(w)
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)
        return tokens + self.pos_embed


class TextStem(nn.Module):
    """Token ids (B, L) -> embeddings + positional embedding; the causal mask is a buffer."""

    mask: Tensor

    def __init__(self, vocab: int, context: int, dim: int, **fk: Any) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, dim, **fk)
        self.pos_embed = nn.Parameter(torch.empty(1, context, dim, **fk))
        mask = torch.full((context, context), float("-inf"), device=fk.get("device"))
        self.register_buffer("mask", mask.triu(1))  # 0 on and below the diagonal

    def forward(self, ids: Tensor) -> Tensor:
        L = ids.shape[1]
        out: Tensor = self.token_embedding(ids) + self.pos_embed[:, :L]
        return out


# ----------------------------------------------------------------------------- heads


class SelectToken(nn.Module):
    def __init__(self, index: int = 0) -> None:
        super().__init__()
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        return x[:, self.index]


class TextHead(nn.Module):
    """Pick the end-of-text token (the argmax of the ids), then LayerNorm and project."""

    def __init__(self, dim: int, out: int, norm_eps: float = 1e-6, **fk: Any) -> None:
        super().__init__()
        norm = nn.LayerNorm(dim, eps=norm_eps, **fk)
        self.proj = nn.Sequential(norm, nn.Linear(dim, out, bias=False, **fk))

    def forward(self, x: Tensor, eot: Tensor) -> Tensor:
        out: Tensor = self.proj(x[torch.arange(x.shape[0], device=x.device), eot])
        return out


class Normalize(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1)


class LogitScale(nn.Module):
    """Multiply by ``min(exp(log_logit_scale), max_scale)``; learnable for text only."""

    def __init__(self, init: float, learnable: bool, max_scale: float = 100.0, **fk: Any) -> None:
        super().__init__()
        self.max_scale = max_scale
        value = torch.full((), math.log(init), **fk)
        if learnable:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)

    def scale(self) -> Tensor:
        return self.log_logit_scale.exp().clamp(max=self.max_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale() * x


# ----------------------------------------------------------------------------- model


class ImageBind(nn.Module):
    """The six ImageBind towers (or a subset) in one module.

    ``forward({modality: tensor})`` returns what the official model returns: unit vectors times
    the modality's logit scale, averaged over clips for 5-D/6-D inputs.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        modalities: Iterable[Modality | str] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        wanted = TOWERS if modalities is None else {Modality.parse(m).tower for m in modalities}
        self.modalities: tuple[Modality, ...] = tuple(m for m in TOWERS if m in wanted)
        fk: Factory = {"device": device, "dtype": dtype}
        self.modality_preprocessors = nn.ModuleDict()
        self.modality_trunks = nn.ModuleDict()
        self.modality_heads = nn.ModuleDict()
        self.modality_postprocessors = nn.ModuleDict()
        for m in self.modalities:
            self._build_tower(m, fk)

    def _build_tower(self, m: Modality, fk: Factory) -> None:
        cfg, p = self.cfg, self.cfg.preprocess
        t = cfg.trunk(m)
        D, n = t.width, cfg.num_patches(m)
        if m is Modality.VISION:
            k3 = cfg.vision_patch
            proj = ClipPatchProj(RepeatFrames(p.video_frames), PatchProj(3, D, k3, k3, **fk))
            stem: nn.Module = PatchStem(PatchEmbed(proj), n, D, **fk)
        elif m is Modality.TEXT:
            stem = TextStem(p.vocab_size, p.context_length, D, **fk)
        elif m is Modality.AUDIO:
            ka, sa = (cfg.audio_patch,) * 2, (cfg.audio_stride,) * 2
            conv = PatchProj(1, D, ka, sa, **fk)
            stem = PatchStem(PatchEmbed(conv, nn.LayerNorm(D, **fk)), n, D, **fk)
        elif m in (Modality.DEPTH, Modality.THERMAL):
            k = cfg.depth_patch if m is Modality.DEPTH else cfg.thermal_patch
            conv = PatchProj(1, D, (k, k), (k, k), **fk)
            name = "depth_stem" if m is Modality.DEPTH else "rgbt_stem"
            stem = PatchStem(PatchEmbed(conv, nn.LayerNorm(D, **fk)), n, D, stem_name=name, **fk)
        else:
            stem = IMUStem(p.imu_channels, p.imu_samples, cfg.imu_window, D, **fk)
        self.modality_preprocessors[m.value] = stem

        self.modality_trunks[m.value] = Trunk(
            D,
            t.depth,
            t.heads,
            t.mlp_ratio,
            pre_norm=m is Modality.VISION,
            bias_kv=m not in (Modality.VISION, Modality.TEXT),
            drop_path=t.drop_path,
            norm_eps=t.norm_eps,
            **fk,
        )

        out = cfg.embed_dim
        if m is Modality.TEXT:
            head: nn.Module = TextHead(D, out, norm_eps=t.norm_eps, **fk)
        elif m is Modality.IMU:  # an inert Dropout sits before the projection (key index 3)
            head = nn.Sequential(
                nn.LayerNorm(D, eps=t.norm_eps, **fk),
                SelectToken(0),
                nn.Dropout(0.5),
                nn.Linear(D, out, bias=False, **fk),
            )
        else:
            head = nn.Sequential(
                nn.LayerNorm(D, eps=t.norm_eps, **fk),
                SelectToken(0),
                nn.Linear(D, out, bias=False, **fk),
            )
        self.modality_heads[m.value] = head

        if m is Modality.VISION:
            self.modality_postprocessors[m.value] = Normalize()
        else:
            init = getattr(cfg, f"{m.value}_logit_scale")
            scale = LogitScale(
                init, learnable=m is Modality.TEXT, max_scale=cfg.max_logit_scale, **fk
            )
            self.modality_postprocessors[m.value] = nn.Sequential(Normalize(), scale)

    # -- pieces, exposed for tests and for training

    def tokens(self, modality: Modality | str, x: Tensor) -> Tensor:
        """Stem output: (B, L, D) tokens for a batch of single items/clips."""
        out: Tensor = self.modality_preprocessors[Modality.parse(modality).tower.value](x)
        return out

    def trunk_output(self, modality: Modality | str, x: Tensor) -> Tensor:
        """Trunk output (B, L, D) for a batch of single items/clips."""
        m = Modality.parse(modality).tower
        tokens = self.tokens(m, x)
        mask = None
        if m is Modality.TEXT:
            stem: TextStem = self.modality_preprocessors[m.value]  # type: ignore[assignment]
            L = tokens.shape[1]
            mask = stem.mask[:L, :L].to(tokens.dtype)  # (L, L) additive causal mask
        out: Tensor = self.modality_trunks[m.value](tokens, mask)
        return out

    def head_features(self, modality: Modality | str, x: Tensor) -> Tensor:
        """Head output (before normalisation) for a batch of single items/clips."""
        m = Modality.parse(modality).tower
        h = self.trunk_output(m, x)
        if m is Modality.TEXT:  # pool at the end-of-text token: the argmax of the ids
            out: Tensor = self.modality_heads[m.value](h, x.argmax(dim=-1))
        else:
            out = self.modality_heads[m.value](h)
        return out

    def logit_scale(self, modality: Modality | str) -> Tensor | None:
        """The clamped logit scale of a tower (None for vision)."""
        post = self.modality_postprocessors[Modality.parse(modality).tower.value]
        if isinstance(post, nn.Sequential):
            scale: LogitScale = post[1]  # type: ignore[assignment]
            return scale.scale()
        return None

    def embed_one(self, modality: Modality | str, x: Tensor, scaled: bool = True) -> Tensor:
        """Embed one modality: (N, D_out), clip-averaged for 5-D/6-D inputs.

        ``scaled=True`` is the official output. ``scaled=False`` gives unit vectors (the mean of
        per-clip unit vectors, renormalised) for cosine search.
        """
        m = Modality.parse(modality).tower
        if m.value not in self.modality_trunks:
            raise KeyError(
                f"this model has no {m.value} tower (loaded: "
                f"{', '.join(t.value for t in self.modalities)})"
            )
        clips = x.ndim >= 5
        if clips:  # (B, S, ...) -> (B*S, ...): every clip embedded, then averaged
            B, S = x.shape[:2]
            x = x.reshape(B * S, *x.shape[2:])
        y = (
            self.modality_postprocessors[m.value](self.head_features(m, x))
            if scaled
            else F.normalize(self.head_features(m, x), dim=-1)
        )
        if clips:
            y = y.reshape(B, S, -1).mean(dim=1)
            if not scaled:
                y = F.normalize(y, dim=-1)
        return y

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: self.embed_one(k, v) for k, v in inputs.items()}


@torch.no_grad()
def init_weights(model: ImageBind, seed: int | None = None) -> None:
    """Random initialisation in the spirit of the official one (truncated normal linears)."""
    g = torch.Generator(device="cpu")
    if seed is not None:
        g.manual_seed(seed)

    def normal_(t: Tensor, std: float) -> None:
        t.copy_(
            torch.randn(t.shape, generator=g, dtype=torch.float32)
            .mul_(std)
            .clamp_(-2 * std, 2 * std)
        )

    for name, mod in model.named_modules():
        if isinstance(mod, PatchProj):
            normal_(mod.weight, 0.02)
        elif isinstance(mod, nn.Linear):
            normal_(mod.weight, 0.02)
            if mod.bias is not None:
                mod.bias.zero_()
        elif isinstance(mod, nn.LayerNorm):
            mod.weight.fill_(1.0)
            mod.bias.zero_()
        elif isinstance(mod, nn.Embedding):
            normal_(mod.weight, 0.02)
        elif isinstance(mod, Attention):
            normal_(mod.in_proj_weight, 0.02)
            mod.in_proj_bias.zero_()
            if mod.bias_k is not None and mod.bias_v is not None:
                normal_(mod.bias_k, 0.02)
                normal_(mod.bias_v, 0.02)
        elif isinstance(mod, LogitScale):
            pass  # set in __init__; re-set below (to_empty leaves garbage)
        del name
    for m in model.modalities:
        pre = model.modality_preprocessors[m.value]
        for pname, p in pre.named_parameters():
            if pname.endswith("pos_embed"):
                normal_(p, 0.01)
            elif pname.endswith("cls_token"):
                normal_(p, p.shape[-1] ** -0.5)
        if isinstance(pre, TextStem):
            L = int(pre.mask.shape[0])
            pre.mask.copy_(torch.full((L, L), float("-inf")).triu(1))
        if m is not Modality.VISION:
            ls: LogitScale = model.modality_postprocessors[m.value][1]  # type: ignore[index]
            ls.log_logit_scale.fill_(math.log(getattr(model.cfg, f"{m.value}_logit_scale")))
