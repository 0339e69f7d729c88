"""Image generation for the service: which generator to load, and running it off the loop.

The generator (``generate.ImageGenerator``) is chosen by ``BINDSEARCH_GENERATOR``:
"demo", "unclip", a Stable unCLIP directory or hub id, or "none"; unset, it is "demo" when
the served model's reference names a demo decoder made for its weights (``ModelRef.decoder``)
and "none" otherwise (a demo decoder only understands the space it was trained in). It loads
in the background after the model, so search is ready without waiting for it; until then, or
when it cannot load, ``/v1/generate`` answers 503 with the reason. Generations run one at a
time on their own thread, never on the event loop nor on the model thread, so searches are
never queued behind them.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from encoders.errors import EncoderError
from generate import (
    GENERATORS,
    GeneratorInfo,
    ImageGenerator,
    check_embeddings,
    check_generator_dim,
    load_named_generator,
)

from .embedders import ModelInfo
from .errors import ModelFailed, Overloaded, Unavailable
from .settings import ServiceSettings

log = logging.getLogger(__name__)


class NoGenerator(Unavailable):
    type = "no_generator"


def default_generator(model: ModelInfo) -> str:
    """The generator to use when none was chosen: the demo decoder made for the model, if any."""
    return "demo" if model.decoder is not None else "none"


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


class GeneratorSlot:
    """The app's generator (or why there is none) and its one worker thread."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.generator: ImageGenerator | None = None
        self.reason = "the generator is loading"
        self._pool = ThreadPoolExecutor(1, "bindsearch-generate")
        self._pending = 0  # generations running or waiting (event-loop only: no lock needed)

    async def start(self, given: ImageGenerator | None, model: ModelInfo) -> None:
        """Use ``given``, else load the generator the settings name (in a thread)."""
        if given is not None:
            self._set(given, model)
            return
        spec = self.settings.generator or default_generator(model)
        if spec == "none":
            self.reason = (
                "no generator is configured: set BINDSEARCH_GENERATOR to "
                f"{', '.join(GENERATORS)} or a Stable unCLIP directory"
                + ("" if self.settings.generator else f" (the default is none for {model.name})")
            )
            return
        device = self.settings.generator_device or self.settings.device
        try:
            gen = await asyncio.to_thread(
                load_named_generator, spec, model.dim, device, model.sha256, model.decoder
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:  # ImportError, EncoderError, OSError...: search still works
            self.reason = f"the generator {spec!r} could not be loaded: {e}"
            log.warning("generation is off: %s", self.reason)
            return
        self._set(gen, model)

    def _set(self, gen: ImageGenerator, model: ModelInfo) -> None:
        try:
            check_generator_dim(gen.info, model.dim)
        except EncoderError as e:
            self.reason = str(e)
            log.warning("generation is off: %s", self.reason)
            return
        self.generator = gen
        log.info("generator: %s (licence: %s)", gen.info.name, gen.info.licence)

    def require(self) -> ImageGenerator:
        if self.generator is None:
            raise NoGenerator(f"image generation is unavailable: {self.reason}")
        return self.generator

    async def render(self, vector: np.ndarray, seed: int, steps: int | None) -> bytes:
        """One (D,) unit vector -> PNG bytes, on the generation thread; 429 past the queue cap."""
        gen = self.require()
        if self._pending >= self.settings.max_generate_queue:
            raise Overloaded(
                f"{self._pending} generations are running or waiting (the limit is "
                f"{self.settings.max_generate_queue}); retry later",
                self.settings.retry_after_s,
            )
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, _render, gen, vector, seed, steps)
        finally:
            self._pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _render(gen: ImageGenerator, vector: np.ndarray, seed: int, steps: int | None) -> bytes:
    try:
        [img] = gen.generate(vector[None], seed=seed, steps=steps)
    except Exception as e:
        log.exception("generation failed")
        raise ModelFailed(f"the generator failed ({type(e).__name__}: {e})") from None
    return png_bytes(img)


class FakeGenerator:
    """Deterministic images from a hash of (vector, seed, steps), no model: for service tests.

    ``gate``, when given, is waited on before each image (to hold a generation in tests), and
    ``entered`` is set when a generation has started.
    """

    def __init__(self, dim: int = 8, size: int = 16, gate: threading.Event | None = None) -> None:
        self._info = GeneratorInfo(
            name="fake", dim=dim, image_size=size, licence="none (test images)", default_steps=1
        )
        self.gate = gate
        self.entered = threading.Event()
        self.calls: list[tuple[np.ndarray, int, int | None]] = []

    @property
    def info(self) -> GeneratorInfo:
        return self._info

    def image_for(self, vector: np.ndarray, seed: int = 0, steps: int | None = None) -> Image.Image:
        """The image this generator makes for one (D,) vector."""
        v = np.asarray(vector, np.float32)
        digest = hashlib.sha256(v.tobytes() + f"/{seed}/{steps}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        s = self._info.image_size
        return Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8), "RGB")

    def generate(
        self, embeddings: np.ndarray, *, seed: int = 0, steps: int | None = None
    ) -> list[Image.Image]:
        x = check_embeddings(embeddings, self._info.dim)
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        self.calls.append((x.copy(), seed, steps))
        return [self.image_for(row, seed, steps) for row in x]
