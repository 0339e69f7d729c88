"""Which model: one reference, resolved once, handed to every command, the service and the index.

``resolve_model(config, checkpoint)`` holds every rule that picks a model: the preset or JSON
config, the weights file (shipped with the package, downloaded into the cache, or given), its
sha256, the display name, the licence of the weights and the demo decoder made for them. The
default model is named here and nowhere else (``DEFAULT_MODEL``).

    ref = resolve_model()                                   # the shipped demo model
    ref = resolve_model("imagebind_huge")                   # the downloaded official weights
    ref = resolve_model("my.json", "my.safetensors")        # any ImageBind-architecture file
    enc = load_encoder(ref, device="cuda")                  # enc.ref is ref
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .checkpoint import sha256_file
from .config import PRESETS, ModelConfig, resolve_config
from .errors import CheckpointError, DownloadError, UnknownWeights
from .modality import TOWERS, Modality
from .weights import (
    BUNDLED,
    BUNDLED_LICENCE,
    WEIGHTS,
    bundled_decoder,
    bundled_weights,
    cache_root,
    cached_weights_path,
    downloaded_spec,
    weights_for_config,
)

# The model every command, the service and the demo use when none is named.
DEFAULT_MODEL = "imagebind_demo"

RANDOM_LICENCE = "none: random weights, testing only"
GIVEN_LICENCE = "unknown: a checkpoint you supplied"
# Files this large keep their sha256 in the cache between runs (the official weights are 4.5 GB:
# hashing them takes longer than loading them).
_PERSIST_SHA_BYTES = 64 << 20

Source = Literal["shipped", "downloaded", "given", "random"]


@dataclass(frozen=True)
class ModelRef:
    """A model, fully resolved: architecture, weights, identity, name, licence, decoder.

    Args:
        config_name: the preset name or JSON file the config came from ("custom" for an object).
        config: the architecture.
        weights: the weights file; None for seeded random weights (tests, benchmarks).
        sha256: of ``weights`` (hex); None with random weights.
        source: "shipped" (package data), "downloaded" (the cache), "given", or "random".
        name: display name (``/v1/info``, logs).
        licence: of the weights, shown wherever they are served.
        decoder: the demo decoder trained for these weights, if one ships.
        seed: of the random weights.
    """

    config_name: str
    config: ModelConfig = field(repr=False)
    weights: Path | None
    sha256: str | None
    source: Source
    name: str
    licence: str
    licence_url: str | None = None
    decoder: Path | None = None
    seed: int = 0

    @property
    def identity(self) -> str:
        """``sha256:<hex>`` of the weights, or ``random:<seed>``: what an index records."""
        if self.sha256 is None:
            return f"random:{self.seed}"
        return f"sha256:{self.sha256}"

    @property
    def towers(self) -> dict[str, str]:
        """Per tower, what its weights are (``tower_hashes``); ``random:<seed>`` for each
        tower of random weights. Computed on first use, then cached (``tower_hashes``)."""
        if self.weights is None or self.sha256 is None:
            return {t.value: self.identity for t in TOWERS}
        return tower_hashes(self.weights, self.sha256)


def resolve_model(
    config: str | Path | ModelConfig | dict[str, Any] | None = None,
    checkpoint: str | Path | None = None,
    *,
    random_weights: bool = False,
    seed: int = 0,
) -> ModelRef:
    """The model named by a config and a checkpoint, with every default filled in.

    Args:
        config: a preset name (``list_presets()``), a JSON file (our form or the official
            ``ImageBindModel`` constructor kwargs), or a config object; None: ``DEFAULT_MODEL``.
        checkpoint: a ``.pth``/``.safetensors`` file. None: the weights shipped with the
            preset, else its downloaded official weights (``bindsearch weights download``).
        random_weights: seeded random weights of the config (tests only); no checkpoint then.

    Raises one-line errors: ``ValueError`` for an unknown config, ``CheckpointError`` for a
    missing file, ``DownloadError``/``UnknownWeights`` when no weights are there to use.
    """
    spec_of_config: str | Path | ModelConfig | dict[str, Any] = (
        DEFAULT_MODEL if config is None else config
    )
    cfg = resolve_config(spec_of_config)
    name = _config_name(spec_of_config, cfg)
    if random_weights:
        if checkpoint is not None:
            raise ValueError("random weights take no checkpoint: give one or the other")
        display = f"{name} (random weights)"
        return ModelRef(name, cfg, None, None, "random", display, RANDOM_LICENCE, seed=seed)
    if checkpoint is not None:
        return _given(name, cfg, Path(checkpoint))
    shipped = bundled_weights(name)
    if shipped is not None:
        if not shipped.is_file():
            raise DownloadError(f"the shipped {name} weights are missing from {shipped}")
        return _shipped(name, cfg, shipped)
    spec = weights_for_config(name)
    if spec is None:
        downloadable = ", ".join(sorted(s.config for s in WEIGHTS.values()))
        raise UnknownWeights(
            f"no weights for config {name!r}: pass --checkpoint FILE (weights ship with "
            f"{', '.join(sorted(BUNDLED))}; {downloadable} can be downloaded)"
        )
    try:
        path = cached_weights_path(spec)
    except DownloadError:
        raise DownloadError(
            f"no model weights given and none downloaded: pass --checkpoint FILE (and "
            f"--config), or run `bindsearch weights download {spec.name}` first"
        ) from None
    return ModelRef(
        name,
        cfg,
        path,
        file_sha256(path),
        "downloaded",
        spec.name,
        spec.licence,
        spec.licence_url,
    )


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a weights file, computed once per (file, size, mtime).

    Within a process ``sha256_file`` remembers it; a file of 64 MB or more also keeps it in
    ``$BINDSEARCH_CACHE/sha256/`` so later runs do not read 4.5 GB again.
    """
    p = Path(path).resolve()
    st = p.stat()
    if st.st_size < _PERSIST_SHA_BYTES:
        return sha256_file(p)
    key = hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    record = cache_root() / "sha256" / key
    try:
        text = record.read_text().strip()
        if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
            return text
    except OSError:
        pass
    sha = sha256_file(p)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{key}.{os.getpid()}.tmp")
        tmp.write_text(sha + "\n")
        os.replace(tmp, record)
    except OSError:
        pass  # a read-only cache only costs the next run a re-hash
    return sha


# The module dicts a tower's state-dict keys live under (``<module>.<tower>.<rest>``): stem,
# trunk, head, postprocessor. ``train --init`` freezes by it and the index fingerprints by it.
TOWER_MODULES = (
    "modality_preprocessors",
    "modality_trunks",
    "modality_heads",
    "modality_postprocessors",
)
TOWER_HASH_VERSION = 1
_TOWER_HASHES: dict[str, dict[str, str]] = {}  # weights sha256 -> tower_hashes, this process


def tower_of_key(key: str) -> str | None:
    """The tower a state-dict key belongs to (``modality_trunks.audio.x`` -> ``audio``), or None
    for a key outside every tower."""
    parts = key.split(".")
    if len(parts) > 2 and parts[0] in TOWER_MODULES:
        return parts[1]
    return None


def tower_config(config: ModelConfig, tower: Modality | str) -> dict[str, Any]:
    """The part of ``config`` that shapes one tower's vectors: its trunk, patching, logit scale,
    the shared embedding width and its own preprocessing constants (video's for vision)."""
    t = Modality.parse(tower).tower.value
    d = config.to_dict()
    prefixes = {"vision": ("image_", "video_"), "text": ("context_length", "vocab_size")}
    pre = {k: v for k, v in d["preprocess"].items() if k.startswith(prefixes.get(t, (t + "_",)))}
    own = {k: v for k, v in d.items() if k == t or k.startswith(t + "_")}
    return {
        "arch": d["arch"],
        "embed_dim": d["embed_dim"],
        "max_logit_scale": d["max_logit_scale"],
        **own,
        "preprocess": pre,
    }


def tower_hashes(weights: str | Path, sha256: str | None = None) -> dict[str, str]:
    """Per tower, the sha256 of its tensors in a weights file (names, dtypes, shapes, bytes).

    Keys outside every tower (none in ImageBind's layout) count for every tower. Hashed once per
    file content: remembered in this process, in the card of exported weights
    (``weights_card``: ``towers``) and, for a file of 64 MB or more, in
    ``$BINDSEARCH_CACHE/towers/<sha256>.json``, so the official 4.5 GB are not read again.
    """
    sha = sha256 if sha256 is not None else file_sha256(weights)
    card = weights_card(weights, sha)
    known = _TOWER_HASHES.get(sha)
    if known is not None:
        return _with_adapters(known, card)
    hashes = _valid_tower_hashes(card.get("towers") if card else None)
    big = Path(weights).stat().st_size >= _PERSIST_SHA_BYTES
    record = cache_root() / "towers" / f"{sha}.json"
    if hashes is None and big:
        try:
            hashes = _valid_tower_hashes(json.loads(record.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            hashes = None
    if hashes is None:
        hashes = _hash_towers(Path(weights))
        if big:
            try:
                record.parent.mkdir(parents=True, exist_ok=True)
                tmp = record.with_name(f".{sha}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(hashes, sort_keys=True) + "\n", encoding="utf-8")
                os.replace(tmp, record)
            except OSError:
                pass  # a read-only cache only costs the next run a re-hash
    _TOWER_HASHES[sha] = hashes
    return _with_adapters(hashes, card)


def _with_adapters(hashes: dict[str, str], card: dict[str, Any] | None) -> dict[str, str]:
    """Adapters kept beside the weights (``train --init --keep-adapters``, merged at load by
    ``load_encoder``) change the towers they adapt: their sha256 joins those towers' hashes."""
    out = dict(hashes)
    adapters = card.get("adapters_sha256") if card else None
    if card and isinstance(adapters, str):
        for tower in card.get("towers_changed") or ():
            if tower in out:
                out[tower] = hashlib.sha256(
                    f"{out[tower]}+adapters:{adapters}".encode()
                ).hexdigest()
    return out


def _valid_tower_hashes(value: object) -> dict[str, str] | None:
    names = {t.value for t in TOWERS}
    if (
        isinstance(value, dict)
        and set(value) == names
        and all(isinstance(h, str) and len(h) == 64 for h in value.values())
    ):
        return dict(value)
    return None


def _hash_towers(path: Path) -> dict[str, str]:
    import torch

    from .checkpoint import read_state_dict, remap_imagebind_keys

    sd = remap_imagebind_keys(read_state_dict(path))
    hashers = {t.value: hashlib.sha256(f"towers v{TOWER_HASH_VERSION}".encode()) for t in TOWERS}
    for key in sorted(sd):
        t = sd[key]
        tower = tower_of_key(key)
        head = f"{key}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode()
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        for name in [tower] if tower in hashers else list(hashers):
            hashers[name].update(head)
            hashers[name].update(data.data)
    return {name: h.hexdigest() for name, h in hashers.items()}


def _config_name(spec: str | Path | ModelConfig | dict[str, Any], cfg: ModelConfig) -> str:
    if isinstance(spec, str | Path):
        return str(spec)
    return next((k for k, v in PRESETS.items() if v == cfg), "custom")


def _shipped(name: str, cfg: ModelConfig, path: Path) -> ModelRef:
    return ModelRef(
        name,
        cfg,
        path,
        file_sha256(path),
        "shipped",
        name,
        BUNDLED_LICENCE,
        None,
        bundled_decoder(name),
    )


def _given(name: str, cfg: ModelConfig, path: Path) -> ModelRef:
    """A given file; when it holds the shipped or the downloaded weights, their name and licence."""
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist: give a .pth or .safetensors weights file"
        )
    sha = file_sha256(path)
    shipped = bundled_weights(name)
    if shipped is not None and shipped.is_file() and file_sha256(shipped) == sha:
        return ModelRef(
            name, cfg, path, sha, "given", name, BUNDLED_LICENCE, None, bundled_decoder(name)
        )
    spec = downloaded_spec(path)
    if spec is not None:
        # Converted from the official file: its licence binds however the file is named.
        return ModelRef(name, cfg, path, sha, "given", spec.name, spec.licence, spec.licence_url)
    card = weights_card(path, sha)
    if card is not None and isinstance(card.get("licence"), str):
        # Exported by ``train --init``: the licence of the weights it started from.
        url = card.get("licence_url")
        return ModelRef(
            name, cfg, path, sha, "given", path.stem, card["licence"], url if url else None
        )
    return ModelRef(name, cfg, path, sha, "given", path.stem, GIVEN_LICENCE)


def card_path(weights: str | Path) -> Path:
    """The JSON card that describes exported weights: ``model.safetensors`` -> ``model.json``."""
    return Path(weights).with_suffix(".json")


# card path -> ((mtime_ns, size, inode) when read, its parsed JSON), this process
_CARDS: dict[str, tuple[tuple[int, int, int], Any]] = {}
_MAX_CARDS = 256


def _read_card(path: Path) -> Any:
    """A card's parsed JSON, read again only when the file changed (its mtime, size or inode):
    ``tower_hashes`` asks for it on every model fingerprint. None when missing or not JSON."""
    try:
        st = path.stat()
    except OSError:
        return None
    key, seen = (st.st_mtime_ns, st.st_size, st.st_ino), _CARDS.get(str(path))
    if seen is not None and seen[0] == key:
        return seen[1]
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        card = None
    if len(_CARDS) >= _MAX_CARDS:
        _CARDS.clear()
    _CARDS[str(path)] = (key, card)
    return card


def weights_card(weights: str | Path, sha256: str | None = None) -> dict[str, Any] | None:
    """The card beside ``weights`` (``train --init`` writes it: config, init weights, towers
    changed, data, licence), or None when there is none or it describes another file
    (its ``sha256`` is not ``sha256``, default: the file's). The file is read once per change
    of its mtime, size or inode; each call returns a copy of its own."""
    card = _read_card(card_path(weights).absolute())
    if not isinstance(card, dict):
        return None
    want = sha256 if sha256 is not None else file_sha256(Path(weights))
    return copy.deepcopy(card) if card.get("sha256") == want else None
