"""Reading request bodies by hand, for routes that take JSON or multipart on one path.

Every body is bounded while it streams in, before any of it is parsed: JSON by bytes
(``json_body_limit``) and by the number of values it holds (``JsonShape``); multipart by
parts, by bytes per file (each spooled to a temporary file as it arrives) and per field.
The request as a whole and the bytes held by all requests are bounded in ``service.limits``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from tempfile import SpooledTemporaryFile
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from ..errors import MalformedRequest, PayloadTooLarge, UnsupportedMedia
from ..limits import content_length
from ..settings import ServiceSettings

M = TypeVar("M", bound=BaseModel)

# JSON bodies up to this size are parsed on the event loop (their values are bounded too: a
# millisecond at most); bigger ones in the thread pool.
INLINE_JSON_BYTES = 16 << 10
# A multipart file part is kept in memory up to this size, then spooled to disk.
SPOOL_BYTES = 1 << 20
# The headers of one multipart part (Content-Disposition, Content-Type): a few hundred bytes.
MAX_PART_HEADER_BYTES = 16 << 10


def validation_message(e: ValidationError, prefix: str = "body") -> str:
    """Pydantic's errors as one line: ``body.k: Input should be ...; ...``."""
    parts = []
    for err in e.errors(include_url=False)[:5]:
        loc = ".".join(str(x) for x in (prefix, *err["loc"]))
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def content_kind(request: Request) -> str:
    """``json`` or ``multipart``; 415 for anything else."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        return "json"
    if ctype == "multipart/form-data":
        return "multipart"
    raise UnsupportedMedia(
        f"request body of type {ctype or 'none'!r}; accepted: application/json or "
        "multipart/form-data"
    )


def require_json(request: Request) -> None:
    """415 unless the body is JSON (an absent Content-Type is taken as JSON)."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMedia(f"request body of type {ctype!r}; accepted: application/json")


class JsonShape:
    """Counts the values of a JSON text as it streams in, without parsing it.

    Every ``{``, ``[`` and ``,`` outside strings counts one, so the count bounds the objects,
    members and array items the parser would build. Strings are skipped at C speed (one
    regex match per string or chunk), so a body of long base64 strings costs nothing here and
    a flood of tiny values is refused after ``limit`` of them. Syntax is not checked: the
    parser does that once the body is complete and known to be small enough.
    """

    _IN_STRING = re.compile(rb'(?:[^"\\]+|\\.)*', re.DOTALL)  # up to a quote or a lone "\"
    _OUTSIDE = re.compile(rb'["\[{,]')
    _WINDOW = 1 << 16  # bytes of a string matched at once (sre keeps state per escape)

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.values = 0
        self._in_string = False
        self._escape = False  # the last chunk ended inside a string on a backslash

    def feed(self, chunk: bytes) -> None:
        """Count ``chunk``'s values; ``PayloadTooLarge`` once they pass the limit."""
        i, n = 0, len(chunk)
        while i < n:
            if self._in_string:
                if self._escape:
                    self._escape = False
                    i += 1
                    continue
                end = min(n, i + self._WINDOW)
                m = self._IN_STRING.match(chunk, i, end)
                assert m is not None  # the pattern matches the empty string
                i = m.end()
                if i == end:
                    continue
                if chunk[i] == 0x5C:  # a backslash whose escaped byte is in the next chunk
                    self._escape = True
                else:  # the closing quote
                    self._in_string = False
                i += 1
            else:
                o = self._OUTSIDE.search(chunk, i)
                if o is None:
                    break
                i = o.end()
                if chunk[o.start()] == 0x22:
                    self._in_string = True
                    continue
                self.values += 1
                if self.values > self.limit:
                    raise PayloadTooLarge(
                        f"the JSON body holds more than {self.limit} values; a request takes "
                        "at most max_inputs terms, texts or inputs"
                    )


async def read_json(request: Request, model: type[M], settings: ServiceSettings) -> M:
    """The body as ``model``, bounded in bytes and values before it is parsed."""
    limit = settings.json_body_limit
    hint = "files in JSON are base64: send big ones as multipart, which streams"
    declared = content_length(request.scope)
    if declared is not None and declared > limit:
        raise PayloadTooLarge(
            f"the JSON body is {declared} bytes; the limit is {limit} bytes ({hint})"
        )
    shape = JsonShape(settings.json_values_limit)
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise PayloadTooLarge(f"the JSON body is over the limit of {limit} bytes ({hint})")
        shape.feed(chunk)
        body += chunk
    try:
        if len(body) <= INLINE_JSON_BYTES:
            return model.model_validate_json(body)
        return await run_in_threadpool(model.model_validate_json, body)
    except ValidationError as e:
        raise MalformedRequest(validation_message(e)) from None


@dataclass(frozen=True)
class FilePart:
    name: str
    data: bytes


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    file: SpooledTemporaryFile[bytes] | None = None
    size: int = 0
    data: bytearray = field(default_factory=bytearray)  # a field's value


class _FormReader:
    """python-multipart callbacks that enforce the caps as the parts arrive."""

    def __init__(
        self,
        file_field: str,
        max_files: int,
        max_fields: int,
        max_file_bytes: int,
        max_field_bytes: int,
    ) -> None:
        self.file_field = file_field
        self.max_files = max_files
        self.max_fields = max_fields
        self.max_file_bytes = max_file_bytes
        self.max_field_bytes = max_field_bytes
        self.parts: list[_Part] = []
        self.n_files = 0
        self.n_fields = 0
        self.pending: list[tuple[_Part, bytes]] = []  # file bytes to write after this chunk
        self._part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._header_bytes = 0
        self._disposition = b""

    def on_part_begin(self) -> None:
        self._part = _Part()
        self._header_bytes = 0
        self._disposition = b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]
        self._count_header(end - start)

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        self._count_header(end - start)

    def _count_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise PayloadTooLarge(
                f"a multipart part's headers are over {MAX_PART_HEADER_BYTES} bytes"
            )

    def on_header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise MalformedRequest(
                "a multipart part has no name: each part needs "
                'Content-Disposition: form-data; name="..."'
            )
        part = self._part
        part.name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            if part.name != self.file_field:
                raise MalformedRequest(
                    f"a file was sent in field {part.name!r}; files go in {self.file_field!r}"
                )
            self.n_files += 1
            if self.n_files > self.max_files:
                raise PayloadTooLarge(
                    f"more than {self.max_files} files in one request; the limit is "
                    f"{self.max_files}"
                )
            part.filename = options[b"filename"].decode("utf-8", "replace")
            part.file = SpooledTemporaryFile(max_size=SPOOL_BYTES)
        else:
            if part.name == self.file_field:
                raise MalformedRequest(f"field {self.file_field!r} must be a file upload")
            self.n_fields += 1
            if self.n_fields > self.max_fields:
                raise PayloadTooLarge(
                    f"more than {self.max_fields} form fields in one request; the limit is "
                    f"{self.max_fields}"
                )
        self.parts.append(part)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        part.size += end - start
        if part.file is not None:
            if part.size > self.max_file_bytes:
                raise PayloadTooLarge(
                    f"file {part.filename!r}: over the limit of {self.max_file_bytes} bytes "
                    "per upload"
                )
            self.pending.append((part, data[start:end]))
        else:
            if part.size > self.max_field_bytes:
                raise PayloadTooLarge(
                    f"form field {part.name!r}: over the limit of {self.max_field_bytes} bytes"
                )
            part.data += data[start:end]

    def on_part_end(self) -> None:
        pass

    def on_end(self) -> None:
        pass

    def close(self) -> None:
        for part in self.parts:
            if part.file is not None:
                part.file.close()


def _write(pending: list[tuple[_Part, bytes]]) -> None:
    for part, data in pending:
        assert part.file is not None
        part.file.write(data)


def _read(part: _Part) -> bytes:
    assert part.file is not None
    part.file.seek(0)
    return part.file.read()


async def read_form(
    request: Request, settings: ServiceSettings, file_field: str = "file"
) -> tuple[list[FilePart], dict[str, list[str]]]:
    """Multipart -> (the ``file_field`` uploads, every other field as a list of strings).

    Caps, checked as the body streams in: ``max_inputs`` files, ``2 * max_inputs + 64``
    other fields, ``max_upload_bytes`` per file, ``4 * max_text_chars`` bytes per field.
    """
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise MalformedRequest(
            "multipart/form-data without a boundary: send Content-Type: "
            "multipart/form-data; boundary=..."
        )
    reader = _FormReader(
        file_field,
        max_files=settings.max_inputs,
        max_fields=2 * settings.max_inputs + 64,
        max_file_bytes=settings.max_upload_bytes,
        max_field_bytes=settings.max_text_chars * 4,
    )
    callbacks = {
        name: getattr(reader, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
            "on_end",
        )
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        async for chunk in request.stream():
            parser.write(chunk)
            if reader.pending:
                spooled = all(p.size <= SPOOL_BYTES for p, _ in reader.pending)
                if spooled:  # still in memory: a copy, cheaper than a thread hop
                    _write(reader.pending)
                else:
                    await run_in_threadpool(_write, list(reader.pending))
                reader.pending.clear()
        parser.finalize()
        files: list[FilePart] = []
        fields: dict[str, list[str]] = {}
        for part in reader.parts:
            if part.file is not None:
                big = part.size > SPOOL_BYTES
                data = await run_in_threadpool(_read, part) if big else _read(part)
                files.append(FilePart(part.filename or f"{file_field} #{len(files)}", data))
            else:
                fields.setdefault(part.name, []).append(part.data.decode("utf-8", "replace"))
    except FormParserError:
        raise MalformedRequest("the multipart body does not parse (boundary or parts)") from None
    finally:
        reader.close()
    return files, fields


def split_list(values: list[str]) -> list[str]:
    """Repeated form fields, each possibly comma-separated -> one flat list."""
    return [v.strip() for raw in values for v in raw.split(",") if v.strip()]
