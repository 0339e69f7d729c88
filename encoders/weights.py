"""Published weights: a registry, a resumable checked download, a one-time safetensors copy.

The cache lives in ``$BINDSEARCH_CACHE`` (default ``~/.cache/bindsearch``)::

    weights/imagebind_huge.pth.part          while downloading (resumed with HTTP Range)
    weights/imagebind_huge.pth.part.validator  the ETag/Last-Modified the .part came from
    weights/imagebind_huge.pth.sha256        checksum recorded on first use (no official one)
    weights/imagebind_huge.safetensors       what the encoder loads

Weights published in another layout (``layout="open_clip"``) are checked and mapped onto our
keys in the same conversion (``encoders.openclip``).

HTTP goes through ``urllib.request`` only: no extra dependency for one download.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import Tensor

from .checkpoint import read_state_dict, save_safetensors, sha256_file
from .config import resolve_config
from .errors import DownloadError, EncoderError, UnknownWeights

CACHE_ENV = "BINDSEARCH_CACHE"
TIMEOUT_S = 30.0  # per connect and per read: a stalled server fails instead of hanging
_CHUNK = 1 << 20
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
# Metadata keys of the safetensors copy: which file it was converted from.
META_SHA256 = "source_sha256"
META_URL = "source_url"


@dataclass(frozen=True)
class WeightsSpec:
    """Where a set of published weights lives, how to check it, and under what licence.

    Args:
        name: registry key, also the stem of the cached files.
        config: the ``PRESETS`` architecture these weights load into.
        sha256: of the file at ``url``; None when the publisher gives none (the first
            download records one, see ``download_weights``).
        size: bytes, when known; checked against the server's Content-Length.
        licence_notice: one paragraph shown before downloading.
        layout: the key layout of the published file: ``imagebind`` (ours, the official
            one) or ``open_clip`` (open_clip's CLIP layout, mapped onto the vision and text
            towers of ``config`` by ``encoders.openclip``).
    """

    name: str
    config: str
    url: str
    filename: str
    sha256: str | None
    size: int | None
    licence: str
    licence_url: str
    licence_notice: str
    layout: Literal["imagebind", "open_clip"] = "imagebind"

    @property
    def stem(self) -> str:
        """The converted file's name without suffix: ``<name>.safetensors``."""
        return self.name


_CC_BY_NC_4 = "https://creativecommons.org/licenses/by-nc/4.0/"
_MIT = "https://opensource.org/license/mit"
_OPENCLIP_H14 = "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

WEIGHTS: dict[str, WeightsSpec] = {
    "imagebind_huge": WeightsSpec(
        name="imagebind_huge",
        config="imagebind_huge",
        url="https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth",
        filename="imagebind_huge.pth",
        # Meta publishes no checksum for this file, and none could be found with confidence
        # elsewhere: the first download records the one it computed (trust on first use).
        sha256=None,
        size=None,
        licence="CC-BY-NC 4.0",
        licence_url=_CC_BY_NC_4,
        licence_notice=(
            "The imagebind_huge weights are published by Meta Platforms, Inc. under the "
            "Creative Commons Attribution-NonCommercial 4.0 International licence "
            f"(CC-BY-NC 4.0, {_CC_BY_NC_4}). You may use, share and adapt them for "
            "non-commercial purposes only, and must give credit. That licence is not "
            "bindsearch's: it covers the weights and anything you publish that is derived "
            "from them, such as embeddings and indexes. Downloading them means accepting it."
        ),
    ),
    # OpenCLIP ViT-H-14 trained on LAION-2B (laion2b_s32b_b79k): the image and text towers of
    # openclip_vit_h14_bind, published by LAION as safetensors in open_clip's layout.
    "openclip_vit_h14": WeightsSpec(
        name="openclip_vit_h14",
        config="openclip_vit_h14_bind",
        url=f"{_OPENCLIP_H14}/resolve/main/open_clip_model.safetensors",
        filename="openclip_vit_h14.open_clip_model.safetensors",
        # The checksum of this file could not be read from its publisher here (only from
        # third-party copies): the first download records the one it computed.
        sha256=None,
        size=None,
        licence="MIT",
        licence_url=_MIT,
        licence_notice=(
            "The OpenCLIP ViT-H-14 laion2b_s32b_b79k weights are published by LAION under the "
            f"MIT licence ({_MIT}; model card: {_OPENCLIP_H14}). You may use, copy, modify "
            "and distribute them, commercially too, keeping the copyright and permission "
            "notice. Their model card adds advice that is not a licence term: the model is a "
            "research output, and deployed use without thorough in-domain testing is out of "
            "scope. Only the image and text towers come from these weights; bindsearch binds "
            "the other towers with `bindsearch train --init openclip_vit_h14_bind`."
        ),
        layout="open_clip",
    ),
}


@dataclass(frozen=True)
class FetchResult:
    """What ``fetch_weights`` did.

    Args:
        source_sha256: sha256 of the downloaded ``.pth`` the safetensors file was made from.
        checksum: ``verified`` against a known sha256 (the registry's or the caller's);
            ``recorded`` on first use because none is published; ``matched-record`` against
            the one recorded earlier; ``cached`` when nothing was downloaded.
        sidecar: the recorded-checksum file, for ``recorded``/``matched-record``.
    """

    path: Path
    source_sha256: str | None
    checksum: Literal["verified", "recorded", "matched-record", "cached"]
    sidecar: Path | None = None


def known_weights() -> list[str]:
    """Names of the registered weights."""
    return sorted(WEIGHTS)


def resolve_weights(name_or_spec: str | WeightsSpec) -> WeightsSpec:
    """The registry entry of a name (a spec passes through)."""
    if isinstance(name_or_spec, WeightsSpec):
        return name_or_spec
    try:
        return WEIGHTS[name_or_spec]
    except KeyError:
        raise UnknownWeights(
            f"unknown weights {name_or_spec!r}; known: {', '.join(known_weights())}"
        ) from None


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$BINDSEARCH_CACHE``, else ``~/.cache/bindsearch``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "bindsearch"


def weights_dir(cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / "weights"


def sidecar_path(spec: WeightsSpec, cache_dir: str | Path | None = None) -> Path:
    """Where the checksum recorded on first use is kept (``sha256sum`` format)."""
    return weights_dir(cache_dir) / f"{spec.filename}.sha256"


def read_recorded_sha256(spec: WeightsSpec, cache_dir: str | Path | None = None) -> str | None:
    """The checksum recorded by an earlier download, if any."""
    path = sidecar_path(spec, cache_dir)
    try:
        text = path.read_text().split()
    except FileNotFoundError:
        return None
    if not text or not _HEX64.match(text[0]):
        raise DownloadError(f"{path} is not a sha256 record; delete it and download again")
    return text[0].lower()


def weights_for_config(config: str) -> WeightsSpec | None:
    """The registered weights made for a preset (``WeightsSpec.config``), or None."""
    spec = WEIGHTS.get(config)
    if spec is not None and spec.config == config:
        return spec
    return next((s for s in WEIGHTS.values() if s.config == config), None)


def cached_weights_path(
    name_or_spec: str | WeightsSpec, cache_dir: str | Path | None = None
) -> Path:
    """The converted safetensors file of downloaded weights; raises if it is not there."""
    spec = resolve_weights(name_or_spec)
    path = weights_dir(cache_dir) / f"{spec.stem}.safetensors"
    if _read_source_meta(path) is None:
        raise DownloadError(
            f"{spec.name} weights are not in {weights_dir(cache_dir)}; "
            f"run `bindsearch weights download {spec.name}` first"
        )
    return path


def download_weights(
    name_or_spec: str | WeightsSpec,
    cache_dir: str | Path | None = None,
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """Download (resuming), check and convert published weights; the safetensors path.

    Args:
        url: a mirror (``http(s)://`` or ``file://``) in place of the registry's URL.
        sha256: overrides the registry's checksum (hex).
        progress: a tqdm bar on stderr.
    """
    return fetch_weights(name_or_spec, cache_dir, url=url, sha256=sha256, progress=progress).path


def fetch_weights(
    name_or_spec: str | WeightsSpec,
    cache_dir: str | Path | None = None,
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    keep_source: bool = False,
    retries: int = 2,
) -> FetchResult:
    """``download_weights`` that also says how the file was checked.

    When no checksum is known (none published, none given), the one computed here is written
    to a sidecar and later downloads must match it (trust on first use).

    Args:
        keep_source: keep the downloaded ``.pth`` next to its safetensors copy (by default it
            is deleted: the copy holds the same tensors and the ``.pth`` doubles the disk used).
        retries: how many times a connection dropped mid-file is resumed before giving up.
    """
    spec = resolve_weights(name_or_spec)
    if sha256 is not None and not _HEX64.match(sha256):
        raise DownloadError(f"--sha256 must be 64 hex digits, got {sha256!r}")
    src_url = url or spec.url
    folder = weights_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{spec.stem}.safetensors"
    pth = folder / spec.filename
    sidecar = sidecar_path(spec, cache_dir)

    recorded = read_recorded_sha256(spec, cache_dir)
    expected = (sha256 or spec.sha256 or recorded or "").lower() or None

    meta = _read_source_meta(target)
    if meta is not None and (expected is None or meta.get(META_SHA256) == expected):
        return FetchResult(target, meta.get(META_SHA256), "cached")

    if not pth.is_file():
        got = _download(src_url, pth, expected, size=spec.size, progress=progress, retries=retries)
    else:
        # A download finished earlier but was not converted (interrupted, or keep_source).
        got = sha256_file(pth)
        if expected is not None and got != expected:
            pth.unlink()
            raise DownloadError(
                f"{pth} has sha256 {got}, expected {expected}; deleted it, run the download again"
            )

    try:
        _convert(spec, pth, target, {META_SHA256: got, META_URL: src_url})
    except EncoderError:
        if expected is None:
            # Nothing vouches for this file and it is not a usable checkpoint: do not keep
            # (or record) it, or every later run would trust it.
            pth.unlink(missing_ok=True)
        raise

    status: Literal["verified", "recorded", "matched-record"]
    if expected is None:
        status = "recorded"
    elif expected == recorded and sha256 is None and spec.sha256 is None:
        status = "matched-record"
    else:
        status = "verified"
    if spec.sha256 is None:
        # Without an official checksum, the record is what guards later downloads; one
        # verified against a checksum the caller gave replaces an older first-use record.
        sidecar.write_text(f"{got}  {spec.filename}\n")
    if not keep_source:
        pth.unlink(missing_ok=True)
    return FetchResult(target, got, status, sidecar if spec.sha256 is None else None)


def _download(
    url: str,
    dest: Path,
    expected: str | None,
    size: int | None,
    progress: bool,
    retries: int,
) -> str:
    """Fetch ``url`` into ``dest`` via ``dest.part``, resuming; the file's sha256."""
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            got = _download_once(url, part, size, progress)
            break
        except _Dropped as e:
            if attempt == retries:
                raise DownloadError(
                    f"download of {url} stopped after {e.have} of {e.total or '?'} bytes "
                    f"({e.reason}); run the same command again to resume from {part}"
                ) from None
    if expected is not None and got != expected:
        part.unlink(missing_ok=True)
        _validator_path(part).unlink(missing_ok=True)
        raise DownloadError(
            f"{url} has sha256 {got}, expected {expected}: the file is corrupt or not the one "
            "named; deleted the partial download"
        )
    part.replace(dest)  # atomic: ``dest`` only ever exists complete
    _validator_path(part).unlink(missing_ok=True)
    return got


class _Dropped(Exception):
    """The connection ended before the whole body came: resumable."""

    def __init__(self, have: int, total: int | None, reason: str) -> None:
        super().__init__(reason)
        self.have, self.total, self.reason = have, total, reason


def _validator_path(part: Path) -> Path:
    return part.with_name(part.name + ".validator")


def _download_once(url: str, part: Path, size: int | None, progress: bool) -> str:
    """One request: resume ``part`` if the server honours Range, else start over."""
    from tqdm import tqdm

    have = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "bindsearch"})
    validator_file = _validator_path(part)
    if have:
        req.add_header("Range", f"bytes={have}-")
        if validator_file.is_file():
            # If-Range: the server sends the whole file (200) if it changed since the .part
            # was started, instead of a tail that would not fit the head we have.
            req.add_header("If-Range", validator_file.read_text().strip())
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:
            return _finish_range_not_satisfiable(url, part, e, have)
        raise DownloadError(
            f"could not download {url}: HTTP {e.code} {e.reason}. Check the URL (or pass a "
            "mirror with --url), or download the file yourself and pass it with --checkpoint"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(
            f"could not reach {url}: {reason}. Check the network (or pass a mirror with "
            "--url), or download the file yourself and pass it with --checkpoint"
        ) from None

    with resp:
        status = resp.status or 200  # file:// responses have no status
        h = hashlib.sha256()
        if status == 206 and have:
            start = _content_range_start(resp.headers.get("Content-Range"))
            if start != have:
                raise DownloadError(
                    f"{url} answered a resume from byte {have} with a range starting at "
                    f"{start}; delete {part} and download again"
                )
            _hash_file(part, h)
            mode = "ab"
        else:
            have, mode = 0, "wb"  # the server ignored Range (or the file changed): restart
            validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
            if validator:
                validator_file.write_text(validator)
            else:
                validator_file.unlink(missing_ok=True)
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        if size is not None and total is not None and total != size:
            raise DownloadError(
                f"{url} is {total} bytes, expected {size}: not the file named; check --url"
            )
        with (
            open(part, mode) as out,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                file=sys.stderr,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            while True:
                try:
                    block = resp.read(_CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    # http.client may raise IncompleteRead or the socket may time out/reset;
                    # either way what we have is kept for the next attempt.
                    raise _Dropped(have, total, type(e).__name__) from None
                if not block:
                    break
                out.write(block)  # a local error (disk full) is not a dropped connection
                h.update(block)
                have += len(block)
                bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
    if total is not None and have < total:
        # read(n) returns b"" at a premature EOF instead of raising.
        raise _Dropped(have, total, "connection closed early")
    return h.hexdigest()


def _finish_range_not_satisfiable(
    url: str, part: Path, err: urllib.error.HTTPError, have: int
) -> str:
    """416 to ``Range: bytes=N-``: the .part is complete when the file is N bytes long."""
    m = re.match(r"bytes \*/(\d+)", err.headers.get("Content-Range", "") if err.headers else "")
    if m and int(m.group(1)) == have:
        return _hash_file(part, hashlib.sha256()).hexdigest()
    part.unlink(missing_ok=True)
    _validator_path(part).unlink(missing_ok=True)
    raise DownloadError(
        f"{url} refused to resume a {have}-byte partial download (HTTP 416); deleted it, "
        "run the download again"
    )


def _content_range_start(value: str | None) -> int | None:
    m = re.match(r"bytes (\d+)-", value or "")
    return int(m.group(1)) if m else None


def _hash_file(path: Path, h: hashlib._Hash) -> hashlib._Hash:
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h


def _read_source_meta(path: Path) -> dict[str, str] | None:
    """The metadata of a readable safetensors file we wrote; None if absent or unreadable."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None
    return dict(meta) if META_SHA256 in meta else None


def _convert(spec: WeightsSpec, pth: Path, target: Path, metadata: dict[str, str]) -> None:
    """Write the tensors of ``pth`` to ``target`` as safetensors in our layout, atomically."""
    sd = read_state_dict(pth)  # weights_only: never unpickles code
    if spec.layout == "open_clip":
        from .openclip import openclip_to_bindsearch

        # Checks every key and shape of the open_clip layout first (one-line CheckpointError).
        sd = openclip_to_bindsearch(sd, resolve_config(spec.config))
        metadata = {**metadata, "source_layout": spec.layout}
    tensors = _unshared(sd)
    del sd
    # Readable as the umask says: a cache shared between users serves them all.
    save_safetensors(tensors, target, {**metadata, "format": "pt"})


def _unshared(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors, each with its own storage (safetensors refuses shared ones)."""
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        t = v.detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


# Weights that ship inside the package (encoders/data/), by preset; ``encoders.models`` picks.
BUNDLED: dict[str, str] = {"imagebind_demo": "imagebind_demo.safetensors"}
# The demo decoder trained against each shipped model (``bindsearch train-decoder``).
BUNDLED_DECODERS: dict[str, str] = {"imagebind_demo": "imagebind_demo_decoder.safetensors"}
BUNDLED_LICENCE = (
    "Apache-2.0 (the bindsearch demo model, trained by `bindsearch train` on a generated world; "
    "see encoders/data/MODEL_CARD_imagebind_demo.md)"
)


def bundled_weights(config: str) -> Path | None:
    """The shipped weights of a preset, or None when the preset ships none."""
    name = BUNDLED.get(config)
    if name is None:
        return None
    return Path(__file__).parent / "data" / name


def bundled_decoder(config: str) -> Path | None:
    """The demo decoder shipped for a preset's shipped weights, or None."""
    name = BUNDLED_DECODERS.get(config)
    if name is None:
        return None
    return Path(__file__).parent / "data" / name


def downloaded_spec(path: str | Path) -> WeightsSpec | None:
    """The registered weights a safetensors file was converted from by ``download_weights``.

    Read from the file's metadata (the source URL, or the source checksum we know); None for
    any other file.
    """
    meta = _read_source_meta(Path(path))
    if meta is None:
        return None
    for spec in WEIGHTS.values():
        known = {spec.sha256, read_recorded_sha256(spec)} - {None}
        if meta.get(META_URL) == spec.url or meta.get(META_SHA256) in known:
            return spec
    return None
