"""Reading request bodies by hand, for routes that take JSON or multipart on one path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from ..errors import MalformedRequest, UnsupportedMedia

M = TypeVar("M", bound=BaseModel)


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


async def read_json(request: Request, model: type[M]) -> M:
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise MalformedRequest(validation_message(e)) from None


@dataclass(frozen=True)
class FilePart:
    name: str
    data: bytes


async def read_form(
    request: Request, max_files: int, max_field_bytes: int, file_field: str = "file"
) -> tuple[list[FilePart], dict[str, list[str]]]:
    """Multipart -> (the ``file_field`` uploads, every other field as a list of strings)."""
    form = await request.form(
        max_files=max_files, max_fields=max_files + 64, max_part_size=max_field_bytes
    )
    files: list[FilePart] = []
    fields: dict[str, list[str]] = {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != file_field:
                    raise MalformedRequest(
                        f"a file was sent in field {key!r}; files go in {file_field!r}"
                    )
                data = await value.read()
                files.append(FilePart(value.filename or f"{file_field} #{len(files)}", data))
            elif key == file_field:
                raise MalformedRequest(f"field {file_field!r} must be a file upload")
            else:
                fields.setdefault(key, []).append(value)
    finally:
        await form.close()
    return files, fields


def split_list(values: list[str]) -> list[str]:
    """Repeated form fields, each possibly comma-separated -> one flat list."""
    return [v.strip() for raw in values for v in raw.split(",") if v.strip()]
