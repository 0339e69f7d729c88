"""Reading and checking checkpoints: safe formats only, official key layout, clear errors."""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from .errors import CheckpointError
from .modality import TOWERS, Modality

# Prefixes some training wrappers add in front of the official keys.
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
_KEY = re.compile(r"^modality_(preprocessors|trunks|heads|postprocessors)\.([a-z]+)\.")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed; memoised per (file, size, mtime, inode) in the process.

    One start of ``serve`` or ``index build`` fingerprints the same weights file several times
    (the demo index's name, the build's model identity, the served index's model check): a
    4.5 GB checkpoint is read once, not three times. An index's integrity check on open
    (``index.store``) hashes each chunk file once per process the same way.
    """
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino, chunk)


@functools.lru_cache(maxsize=1 << 16)  # weights files and an index's chunk files
def _sha256(path: str, size: int, mtime_ns: int, inode: int, chunk: int) -> str:
    del size, mtime_ns, inode  # part of the cache key only: a rewritten file is hashed again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_safetensors(
    tensors: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` to ``path`` atomically, with the mode the umask gives new files.

    safetensors itself writes 0600, so weights a user trains or downloads into a shared folder
    would be readable by that user alone.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder: os.replace is atomic only within a filesystem.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.touch()
        mode = tmp.stat().st_mode
        save_file(dict(tensors), str(tmp), metadata=dict(metadata or {}))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_state_dict(path: str | Path, sha256: str | None = None) -> dict[str, Tensor]:
    """Read a ``.pth``/``.pt`` (never unpickling code) or ``.safetensors`` state dict.

    Both are memory-mapped where the format allows, so a large checkpoint is not copied into
    memory before the model takes its tensors. ``sha256``, when given, is checked first.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if sha256 is not None:
        got = sha256_file(path)
        if got.lower() != sha256.lower():
            raise CheckpointError(
                f"checkpoint {path} has sha256 {got}, expected {sha256}: "
                "the file is corrupt, truncated or not the one named"
            )
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch(path)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file: {e}"
        ) from None


def _read_torch(path: Path) -> dict[str, Tensor]:
    try:
        with warnings.catch_warnings():
            # A bare pickle (not torch's zip format) warns about its protocol before the
            # weights-only unpickler refuses it; the refusal is what the user needs to see.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg:
            raise CheckpointError(
                f"checkpoint {path} holds pickled code or objects other than tensors; "
                "refusing to unpickle it (only plain state dicts of tensors are accepted)"
            ) from None
        raise CheckpointError(f"checkpoint {path} is not a readable torch file: {msg}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} is not a readable torch file (truncated or corrupt?): {e}"
        ) from None
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]  # a training checkpoint {"model": state_dict, ...}
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} is not a state dict of tensors")
    return dict(obj)


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
    # Legacy (non-zip) serialisation cannot be memory-mapped: read it whole.
    return torch.load(path, map_location="cpu", weights_only=True)


def remap_imagebind_keys(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official-layout keys for a state dict: strips wrapper prefixes (DDP, compile, ...).

    Our module names are the official ones, so an official checkpoint maps to itself.
    """
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        k = key
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if k.startswith(prefix):
                    k, stripped = k[len(prefix) :], True
        out[k] = value
    return out


def key_modality(key: str) -> Modality | None:
    """The tower a state-dict key belongs to, or None if it is not of this architecture."""
    m = _KEY.match(key)
    if not m:
        return None
    try:
        return Modality(m.group(2))
    except ValueError:
        return None


def state_dict_towers(sd: Mapping[str, Tensor]) -> tuple[Modality, ...]:
    """The towers a state dict has keys of, in ``TOWERS`` order."""
    present = {key_modality(k) for k in sd}
    return tuple(m for m in TOWERS if m in present)


def select_modalities(
    sd: Mapping[str, Tensor], modalities: Iterable[Modality]
) -> dict[str, Tensor]:
    """Keep the keys of the given towers; unknown keys are an error (a foreign checkpoint)."""
    wanted = set(modalities)
    foreign = [k for k in sd if key_modality(k) is None]
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise CheckpointError(
            f"checkpoint has {len(foreign)} keys that are not ImageBind keys ({shown}); "
            f"expected keys like modality_trunks.<{'|'.join(t.value for t in TOWERS)}>.*"
        )
    return {k: v for k, v in sd.items() if key_modality(k) in wanted}


def check_state_dict(sd: Mapping[str, Tensor], expected: Mapping[str, torch.Size]) -> None:
    """Raise one CheckpointError naming every missing key, extra key and shape mismatch."""
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(sd) & set(expected))
        if tuple(sd[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_few(missing)})")
    if extra:
        problems.append(f"{len(extra)} unexpected keys ({_few(extra)})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches ({_few(wrong)})")
    if problems:
        raise CheckpointError(
            "checkpoint does not match the model config: "
            + "; ".join(problems)
            + ". Check that --config names the architecture these weights were trained with."
        )


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")
