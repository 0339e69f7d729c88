"""The embedded default: the shipped demo model and a demo index built on first start.

``bindsearch serve`` with no model and no index serves the default model
(``encoders.DEFAULT_MODEL``, shipped in ``encoders/data/``) over a small index of the generated
demo world (images, depth, thermal, audio, video with soundtrack, IMU), built once into the cache:
``$BINDSEARCH_CACHE/demo/``. The build is the ordinary resumable index build, so an
interrupted first start finishes on the next one; new demo weights get a new index.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from encoders import ModelRef

log = logging.getLogger(__name__)

DEMO_SAMPLES = 120  # x 6 files each: a corpus that builds in about a minute on 2 cores
DEMO_SEED = 0
_MODALITY_OF_KEY = {
    "image": "vision",
    "depth": "depth",
    "thermal": "thermal",
    "audio": "audio",
    "video": "video",
    "imu": "imu",
}


def demo_dir(cache_dir: str | Path | None = None) -> Path:
    from encoders.weights import cache_root

    return cache_root(cache_dir) / "demo"


def ensure_demo_index(
    cache_dir: str | Path | None = None,
    n: int | None = None,
    progress: bool = True,
    ref: ModelRef | None = None,
) -> Path:
    """The demo index directory, generating the world and building the index when missing.

    ``n`` samples of the world (default ``BINDSEARCH_DEMO_SAMPLES``, else 120), embedded by
    ``ref`` (default: ``encoders.resolve_model()``, the default model).
    """
    if n is None:
        n = int(os.environ.get("BINDSEARCH_DEMO_SAMPLES", DEMO_SAMPLES))
    if n < 1:
        raise ValueError(f"BINDSEARCH_DEMO_SAMPLES must be at least 1, got {n}")
    from encoders import resolve_model
    from index.pipeline import BuildOptions, ModelSource, build_index

    ref = ref if ref is not None else resolve_model()
    if ref.sha256 is None:
        raise ValueError("the demo index is built with real weights, not random ones")
    root = demo_dir(cache_dir)
    world = root / f"world-{n}-{DEMO_SEED}"
    corpus = _ensure_world(world, n, progress)
    # Named by the weights: retrained demo weights never meet an index of the old ones.
    out = root / f"index-{n}-{ref.sha256[:12]}"
    if not (out / "manifest.json").is_file():
        log.info("building the demo index in %s (first start only)", out)
    build_index(corpus, out, ModelSource.from_ref(ref), BuildOptions(workers=0, progress=progress))
    return out


def _ensure_world(world: Path, n: int, progress: bool) -> Path:
    """Write the demo world once (atomically) and an index manifest over its files."""
    corpus = world / "corpus.jsonl"
    if corpus.is_file():
        return corpus
    from world import write_demo_world

    tmp = world.with_name(world.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pairs = write_demo_world(tmp, n=n, seed=DEMO_SEED, split="test", progress=progress)
    rows = []
    for line in pairs.read_text(encoding="utf-8").splitlines():
        sample = json.loads(line)
        factors = sample.get("factors", {})
        tags = [f"{k}:{v}" for k, v in sorted(factors.items())]
        for key, modality in _MODALITY_OF_KEY.items():
            if key in sample:
                caption = sample.get("video_text" if key == "video" else "text")
                rows.append(
                    {"path": sample[key], "modality": modality, "caption": caption, "tags": tags}
                )
    (tmp / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    shutil.rmtree(world, ignore_errors=True)
    os.replace(tmp, world)
    return corpus
