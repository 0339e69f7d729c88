"""Service settings: environment variables prefixed ``BINDSEARCH_``, overridable by ``serve``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values a JSON body may hold per allowed input (a term has at most 6 members; tags and
# targets are lists too): generous for any legal request, tiny next to a flood of terms.
JSON_VALUES_PER_INPUT = 64


class ServiceSettings(BaseSettings):
    """Everything the service reads from its environment (``BINDSEARCH_API_KEY`` and so on).

    List settings (``cors_origins``) are JSON in the environment: ``'["https://a.example"]'``.
    """

    model_config = SettingsConfigDict(env_prefix="BINDSEARCH_", extra="ignore")

    # What to serve. ``index`` is a directory built by ``bindsearch index`` or, for tests and
    # demos, a ``.jsonl`` file of items with their vectors (see ``MemorySearcher.from_jsonl``).
    index: Path | None = None
    checkpoint: Path | None = None
    config: str | None = None  # None: encoders.DEFAULT_MODEL, with its shipped weights
    device: str = "cpu"
    # fp32, bf16, fp16, int8 (CPU) or auto: bf16 on GPUs and on CPUs with native bf16 matmul
    # (avx512_bf16, amx_bf16, Arm bf16), fp32 on other CPUs (``encoders.dtype.choose_dtype``).
    dtype: str = "auto"
    random_weights: bool = False  # testing only: the architecture of ``config``, random weights
    # Towers to load (JSON list in the environment, ``'["vision","text"]'``); None: all of them.
    # The huge model's six towers hold 1.2 B parameters; vision + text alone hold 0.99 B.
    modalities: list[str] | None = None
    # torch's CPU threads for the model (None: torch's default, one per core). On a machine
    # shared with other work, fewer threads avoid OpenMP spin-waiting against other processes.
    torch_threads: int | None = Field(None, ge=1)

    # Access.
    api_key: SecretStr | None = None  # when set, /v1 wants ``Authorization: Bearer <key>``
    cors_origins: list[str] = Field(default_factory=list)

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        from encoders.dtype import parse_dtype

        return parse_dtype(value)  # the canonical name ("bfloat16"), or "auto"

    # Dynamic batching, per modality.
    max_batch_size: int = Field(32, ge=1)
    # 0: an idle model takes a request at once; batches still form from what arrives while the
    # model is busy (bench/service.py: 5 ms of waiting cost idle requests 2x their latency).
    max_wait_ms: float = Field(0.0, ge=0)
    max_queue: int = Field(256, ge=1)  # waiting inputs per modality; beyond it: 429
    retry_after_s: int = Field(1, ge=1)
    decode_workers: int = Field(4, ge=1)

    # Search.
    # Seconds between looks at the served index directory: a change committed by
    # ``index sync/add/remove`` or a rebuild is served within about this long (0: never).
    index_poll_seconds: float = Field(2.0, ge=0)
    default_k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1)

    # Upload caps (per input unless said otherwise).
    max_upload_bytes: int = Field(50 << 20, ge=1)
    max_request_bytes: int = Field(200 << 20, ge=1)  # whole request body
    max_pixels: int = Field(40_000_000, ge=1)
    max_audio_seconds: float = Field(300.0, gt=0)
    # A bound on work only: a longer text is cut to the model's context, not refused.
    max_text_chars: int = Field(20_000, ge=1)
    max_inputs: int = Field(32, ge=1)  # files, terms or strings in one request

    # What one request may cost, checked before work (README.md, "Limits").
    # JSON bodies carry files as base64 (4/3 of their bytes): by default one upload at the cap,
    # or several smaller ones, plus 1 MiB for the rest; more or bigger files go as multipart,
    # which streams to disk. A text-only JSON body cannot hold more than this either.
    max_json_bytes: int | None = Field(None, ge=1)  # None: max_upload_bytes * 4/3 + 1 MiB
    # Request bodies held at once by all requests together; beyond it: 429 with Retry-After.
    max_inflight_bytes: int = Field(512 << 20, ge=1)
    max_header_bytes: int = Field(64 << 10, ge=1024)  # request line + headers (``serve``)
    max_headers: int = Field(100, ge=1)  # header fields in one request; beyond it: 431

    # Generation (POST /v1/generate). ``generator``: "demo" (the decoder shipped with the demo
    # weights), a demo-decoder .safetensors, "unclip" (Stable unCLIP, the `generate` extra), a
    # Stable unCLIP directory or hub id, or "none"; unset: "demo" when serving the demo model.
    generator: str | None = None
    generator_device: str | None = None  # default: ``device``
    max_generate_steps: int = Field(100, ge=1)
    max_generate_queue: int = Field(4, ge=1)  # waiting generations; beyond it: 429

    @property
    def json_body_limit(self) -> int:
        """The byte cap of a JSON body: ``max_json_bytes``, or its default from the upload cap."""
        if self.max_json_bytes is not None:
            return self.max_json_bytes
        return self.max_upload_bytes * 4 // 3 + (1 << 20)

    @property
    def json_values_limit(self) -> int:
        """The most values (objects, array items, members) a JSON body may hold.

        Counted as the body streams in, before it is parsed: a legal request holds at most
        ``max_inputs`` terms of a few members each, and 10**6 tiny terms are refused after
        their first few kilobytes instead of being parsed for seconds.
        """
        return JSON_VALUES_PER_INPUT * self.max_inputs + 64
