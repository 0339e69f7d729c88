"""Request and response bodies of the HTTP API (the OpenAPI schema is built from these)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

MODALITY_HELP = (
    "vision, video, audio, depth, thermal, imu or text. If absent it is detected by one rule "
    "everywhere (docs/modalities.md): the content decides (a 16-bit greyscale PNG is depth, "
    "other images vision; a .npy of shape (T, 6) or (6, T) is IMU, other 2-D .npy depth), and "
    "the file name (the upload's, or `filename`) decides what content cannot: a double "
    "extension (scan.depth.png, night.thermal.png, walk.imu.csv), .csv for IMU, .txt/.md for "
    "text. Thermal always needs `modality` or such a name."
)
FILENAME_HELP = "The file's name, a hint for detecting its modality (never opened)."
TOKENS_HELP = "Text only: the text's BPE tokens (without start and end tokens)."
TRUNCATED_HELP = (
    "Text only: true when the text has more tokens than the model reads "
    "(`limits.max_text_tokens` in /v1/info); the model read the first ones, CLIP-style."
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    type: str = Field(description="Machine-readable kind, e.g. invalid_content, overloaded.")
    message: str = Field(description="What was wrong and what is accepted.")


class ErrorBody(BaseModel):
    error: ErrorDetail


class Term(_Strict):
    """One term of a query: exactly one of ``text``, ``item_id`` or ``data`` (base64)."""

    text: str | None = None
    item_id: int | None = None
    data: str | None = Field(None, description="Base64 file content (any modality).")
    modality: str | None = Field(None, description=MODALITY_HELP)
    filename: str | None = Field(None, description=FILENAME_HELP)
    weight: float = Field(1.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_kind(self) -> Term:
        given = [n for n in ("text", "item_id", "data") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("a term has exactly one of text, item_id or data")
        if (self.modality is not None or self.filename is not None) and self.data is None:
            raise ValueError("modality and filename go with data")
        return self


class _Query(_Strict):
    """One of ``text``, ``item_id``, ``data`` or ``terms``: what search and generate share."""

    KINDS: ClassVar[tuple[str, ...]] = ("text", "item_id", "data", "terms")
    text: str | None = None
    item_id: int | None = None
    data: str | None = Field(None, description="Base64 file content (any modality).")
    modality: str | None = Field(None, description=MODALITY_HELP)
    filename: str | None = Field(None, description=FILENAME_HELP)
    terms: list[Term] | None = Field(
        None, description="A weighted mix: each term normalised, weighted, summed, renormalised."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        given = [n for n in self.KINDS if getattr(self, n) is not None]
        if len(given) != 1:
            kinds = ", ".join(self.KINDS[:-1]) + " or " + self.KINDS[-1]
            raise ValueError(f"give exactly one of {kinds}")
        if (self.modality is not None or self.filename is not None) and self.data is None:
            raise ValueError("modality and filename go with data")
        if self.terms is not None and not self.terms:
            raise ValueError("terms is empty")
        return self

    def as_terms(self) -> list[Term]:
        if self.terms is not None:
            return self.terms
        return [
            Term(
                text=self.text,
                item_id=self.item_id,
                data=self.data,
                modality=self.modality,
                filename=self.filename,
                weight=1.0,
            )
        ]


Merge = Literal["calibrated", "raw", "rrf", "per_modality"]
MERGE_HELP = (
    "How the per-modality result lists become one: calibrated (default: by relevance, "
    "comparable across modalities), raw (by cosine), rrf (reciprocal rank fusion) or "
    "per_modality (the top k of each target modality, one after another)."
)
RELEVANCE_HELP = (
    "Estimated relevance to the query, comparable across modalities: the expected share of "
    "the query's tags (or the probability of a true match) that the index's calibration of "
    "this (query modality, item modality) pair gives to the cosine score; 0 to 1."
)

CALIBRATION_NOTE_HELP = (
    "Present (not null) when the calibrated ranking is not calibrated for this search: the "
    "index has no calibration (built by an older bindsearch), or the model's tower that "
    "embeds a query modality changed since the calibration was measured (the note names the "
    "stale query->target pairs). Those pairs are ranked by raw cosine, their `relevance` is "
    "the cosine; `bindsearch index sync` with the served model measures them again. Null for "
    "the raw, rrf and per_modality merges, which do not use the calibration."
)
INFO_CALIBRATION_NOTE_HELP = (
    "Why the served index's calibration does not cover every query (no calibration, or the "
    "stale pairs of changed query towers); null when it does or no index is served. "
    "/v1/search says it per search (`calibration_note`)."
)


class SearchRequest(_Query):
    """A JSON search: exactly one of ``text``, ``item_id``, ``data``, ``terms`` or ``vector``."""

    KINDS: ClassVar[tuple[str, ...]] = ("text", "item_id", "data", "terms", "vector")
    vector: list[Annotated[float, Field(allow_inf_nan=False)]] | None = Field(
        None,
        description="A query embedding of the index's dimension (normalised here); searches "
        "an index of imported vectors without a model too.",
    )
    k: int | None = Field(None, ge=1, description="Results wanted (default 10; capped).")
    target: list[str] | str | None = Field(
        None, description="Item modalities to return (default: all)."
    )
    tags: list[str] | None = Field(None, description="Only items carrying every one of these.")
    tag: list[str] | None = Field(None, description="An alias of `tags` (give one of the two).")

    @model_validator(mode="after")
    def _one_tag_field(self) -> Self:
        if self.tags is not None and self.tag is not None:
            raise ValueError("give `tags` or its alias `tag`, not both")
        return self

    @property
    def tag_filter(self) -> list[str]:
        """The tags to filter by, whichever spelling the body used."""
        return self.tags or self.tag or []

    merge: Merge = Field("calibrated", description=MERGE_HELP)


class GenerateRequest(_Query):
    """A JSON generation: exactly one of ``text``, ``item_id``, ``data`` or ``terms``."""

    seed: int = Field(0, ge=0, le=2**32 - 1, description="Same query and seed, same image.")
    steps: int | None = Field(
        None, ge=1, description="Denoising steps (default: the generator's own; capped)."
    )

    def as_search(self) -> SearchRequest:
        """The same query as a search body (its terms are read the same way)."""
        return SearchRequest(
            text=self.text,
            item_id=self.item_id,
            data=self.data,
            modality=self.modality,
            filename=self.filename,
            terms=self.terms,
            k=None,
            merge="calibrated",
            target=None,
            tags=None,
            tag=None,
            vector=None,
        )


class GenerateForm(_Strict):
    """The generation options of a multipart generate request."""

    seed: int = Field(0, ge=0, le=2**32 - 1)
    steps: int | None = Field(None, ge=1)


class SearchForm(_Strict):
    """The non-file fields of a multipart search (validated like a JSON body)."""

    modality: list[str] = Field(default_factory=list)
    weights: list[float] = Field(default_factory=list)
    k: int | None = Field(None, ge=1)
    target: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    item_id: list[int] = Field(default_factory=list)
    merge: Merge = "calibrated"


class ItemOut(BaseModel):
    id: int
    modality: str
    path: str | None
    start: float | None
    end: float | None
    caption: str | None
    tags: list[str]
    media_url: str | None


class ResultOut(ItemOut):
    score: float = Field(description="Cosine similarity to the query (-1 to 1).")
    relevance: float = Field(description=RELEVANCE_HELP)


class TermEcho(BaseModel):
    kind: Literal["text", "item", "data", "file", "vector"]
    weight: float
    modality: str
    text: str | None = None
    item_id: int | None = None
    filename: str | None = None
    bytes: int | None = None
    tokens: int | None = Field(default=None, description=TOKENS_HELP)
    truncated: bool | None = Field(default=None, description=TRUNCATED_HELP)


class QueryEcho(BaseModel):
    terms: list[TermEcho]
    k: int
    target: list[str] | None
    tags: list[str]
    merge: Merge = "calibrated"


class SearchResponse(BaseModel):
    results: list[ResultOut]
    query: QueryEcho
    took_ms: float
    calibration_note: str | None = Field(default=None, description=CALIBRATION_NOTE_HELP)


class EmbedInput(_Strict):
    """One input to embed: ``text``, or ``data`` (base64) with an optional ``modality``."""

    text: str | None = None
    data: str | None = None
    modality: str | None = Field(None, description=MODALITY_HELP)
    filename: str | None = Field(None, description=FILENAME_HELP)

    @model_validator(mode="after")
    def _one_kind(self) -> EmbedInput:
        if (self.text is None) == (self.data is None):
            raise ValueError("an input has exactly one of text or data")
        if (self.modality is not None or self.filename is not None) and self.data is None:
            raise ValueError("modality and filename go with data")
        return self


class EmbedRequest(_Strict):
    """``{"text": "..."}``, ``{"text": ["...", ...]}`` or ``{"inputs": [...]}``."""

    text: str | list[str] | None = None
    inputs: list[EmbedInput] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> EmbedRequest:
        if (self.text is None) == (self.inputs is None):
            raise ValueError("give exactly one of text or inputs")
        return self


class EmbeddingOut(BaseModel):
    index: int
    modality: str
    embedding: list[float]
    tokens: int | None = Field(default=None, description=TOKENS_HELP)
    truncated: bool | None = Field(default=None, description=TRUNCATED_HELP)


class EmbedResponse(BaseModel):
    model: str
    dim: int
    data: list[EmbeddingOut]


class OpenAIEmbeddingsRequest(BaseModel):
    """OpenAI ``POST /v1/embeddings``: strings are text; data URIs are files of any modality."""

    model_config = ConfigDict(extra="ignore")

    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string or a list of strings. `data:<mime>;base64,...` strings are "
        "files (image/*, audio/*, video/*; `;modality=depth` etc. to say which)."
    )
    model: str = Field(description="Any name: this server has one model.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str
    truncated: bool | None = Field(default=None, description=TRUNCATED_HELP)


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class ModelOut(BaseModel):
    name: str
    sha256: str | None = Field(
        None, description="sha256 of the weights file (the index records the same); null: random."
    )
    licence: str
    licence_url: str | None
    dim: int
    modalities: list[str]
    device: str
    dtype: str


class IndexOut(BaseModel):
    name: str
    modality: str
    count: int
    recipe: dict[str, Any]


class GeneratorOut(BaseModel):
    name: str
    licence: str = Field(description="Licence of the generator's weights.")
    model_sha256: str | None = Field(
        None, description="sha256 of the encoder weights it was made for, when it records one."
    )
    dim: int
    image_size: int
    default_steps: int


class InfoResponse(BaseModel):
    model: ModelOut
    indexes: list[IndexOut]
    calibration_note: str | None = Field(default=None, description=INFO_CALIBRATION_NOTE_HELP)
    limits: dict[str, int | float]  # caps as configured: counts and bytes are integers
    generator: GeneratorOut | None = Field(
        None, description="The image generator of POST /v1/generate; null when there is none."
    )


class Status(BaseModel):
    status: str
    detail: str | None = None
