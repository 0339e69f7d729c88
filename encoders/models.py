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

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .checkpoint import sha256_file
from .config import PRESETS, ModelConfig, resolve_config
from .errors import CheckpointError, DownloadError, UnknownWeights
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


def weights_card(weights: str | Path, sha256: str | None = None) -> dict[str, Any] | None:
    """The card beside ``weights`` (``train --init`` writes it: config, init weights, towers
    changed, data, licence), or None when there is none or it describes another file
    (its ``sha256`` is not ``sha256``, default: the file's)."""
    try:
        card = json.loads(card_path(weights).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict):
        return None
    want = sha256 if sha256 is not None else file_sha256(Path(weights))
    return card if card.get("sha256") == want else None
