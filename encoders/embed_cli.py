"""``bindsearch embed``: files or texts -> L2-normalised vectors, from the command line."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from .cli import fail as _fail
from .dtype import DTYPE_ENV, DTYPE_HELP, parse_dtype
from .errors import EncoderError, InvalidInput
from .formats import RULE
from .modality import Modality
from .models import DEFAULT_MODEL


def embed_files(
    modality: str | None,
    items: list[str],
    checkpoint: Path | None = None,
    config: str | None = None,
    official: bool = False,
    device: str = "cpu",
    batch_size: int = 16,
    note: Callable[[str], None] | None = None,
    dtype: str | None = None,
) -> np.ndarray:
    """Embed ``items`` (paths, or strings for text) -> (N, D) float32 unit vectors, in order.

    Without ``modality`` every path's modality is detected (``encoders.formats.detect``); a
    call may mix modalities. ``config``/``checkpoint``: see ``encoders.resolve_model`` (None:
    the default model). ``note`` hears one line per text longer than the model reads (it
    reads the first tokens, CLIP-style). ``dtype``: see ``encoders.dtype.choose_dtype``
    (None: auto).
    """
    from .encoder import load_encoder
    from .models import resolve_model
    from .transforms.text import count_tokens

    parse_dtype(dtype)  # a bad --dtype fails before anything is read
    plan = plan_items(modality, items)
    mods = list(dict.fromkeys(m for m, _ in plan))  # first-seen order
    ref = resolve_model(config, checkpoint)
    enc = load_encoder(ref, device=device, dtype=dtype, modalities=mods)
    pre = enc.preprocess_cfg
    read = pre.context_length - 2  # start and end tokens take two
    for i, (m, x) in enumerate(plan):
        if m is Modality.TEXT and note is not None:
            n = count_tokens(x, pre.vocab_size)
            if n > read:
                note(
                    f"note: {_label(items[i], i)}: {n} tokens; the model reads the first {read} "
                    "(the rest is cut)"
                )
    out = np.zeros((len(plan), enc.dim), np.float32)
    for m in mods:
        rows = [i for i, (mi, _) in enumerate(plan) if mi is m]
        got = [plan[i][1] for i in rows]
        out[rows] = enc.embed_items(m, got, official=official, batch_size=batch_size)
    return out


def plan_items(modality: str | None, items: list[str]) -> list[tuple[Modality, str]]:
    """Each item with its modality: the one given, or the detected one (text files read).

    With ``modality`` text, an item that names a file is read as a UTF-8 text file; any other
    item is the text itself. An empty file or one not UTF-8 is refused.
    """
    from .formats import detect
    from .transforms.text import read_text_file

    if modality is not None:
        m = Modality.parse(modality)
        if m is not Modality.TEXT:
            return [(m, item) for item in items]
        texts: list[tuple[Modality, str]] = []
        for item in items:
            if _names_file(item):
                try:
                    texts.append((m, read_text_file(item)))
                except InvalidInput as e:
                    raise InvalidInput(f"{item}: {e}") from None
            else:  # the text itself; "" too (the model embeds it, as the official code does)
                texts.append((m, item))
        return texts
    plan = []
    for item in items:
        if not _names_file(item):
            raise FileNotFoundError(
                f"{item}: no such file (to embed strings as text, give -m text)"
            )
        found = detect(item)
        if found.modality is None:
            raise InvalidInput(f"{item}: {found.reason}; or give -m/--modality")
        if found.modality is Modality.TEXT:
            try:
                plan.append((Modality.TEXT, read_text_file(item)))
            except InvalidInput as e:
                raise InvalidInput(f"{item}: {e}") from None
        else:
            plan.append((found.modality, item))
    return plan


def _names_file(item: str) -> bool:
    """Whether ``item`` is the path of a file (a long text is no name: no error)."""
    try:
        return Path(item).is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False


def _label(item: str, i: int) -> str:
    """How a note names an item: its path, or the text's start."""
    if _names_file(item):
        return item
    return f"text #{i} ({item[:24]!r}...)" if len(item) > 24 else f"text #{i} ({item!r})"


def embed(
    items: Annotated[
        list[str],
        typer.Argument(help="Files to embed (with -m text: the strings, or UTF-8 text files)."),
    ],
    modality: Annotated[
        str | None,
        typer.Option(
            "--modality",
            "-m",
            help="vision, video, text, audio, depth, thermal or imu (text: ITEMS are the "
            "strings, or UTF-8 text files; a text longer than the model reads is cut, with a "
            f"note). Default: detected per file. {RULE}",
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write (N, D) float32 .npy here.")
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help=".pth or .safetensors weights.")] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help=f"Preset name or JSON (ours or the official ImageBindModel kwargs); default "
            f"{DEFAULT_MODEL}. Without --checkpoint: imagebind_demo uses the shipped demo "
            "weights, imagebind_huge the downloaded ones."
        ),
    ] = None,
    official: Annotated[
        bool, typer.Option("--official", help="Reproduce the official preprocessing bit for bit.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the vectors as JSON.")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    dtype: Annotated[
        str | None,
        typer.Option(help=f"{DTYPE_HELP} Default: ${DTYPE_ENV}, else auto."),
    ] = None,
) -> None:
    """Embed files (each one's modality detected unless -m) or texts (-m text), in input order."""
    if output is None and not as_json:
        _fail("give -o OUT.npy and/or --json")
    try:
        vectors = embed_files(
            modality,
            items,
            checkpoint,
            config,
            official,
            device,
            batch_size,
            note=_note,
            dtype=dtype,
        )
    except (EncoderError, ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e).strip("'\""))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        np.save(output, vectors.astype(np.float32))
        typer.echo(f"wrote {vectors.shape[0]} x {vectors.shape[1]} vectors to {output}", err=True)
    if as_json:
        json.dump(vectors.tolist(), sys.stdout)
        sys.stdout.write("\n")


def _note(line: str) -> None:
    typer.echo(line, err=True)
