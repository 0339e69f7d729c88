"""``bindsearch generate``: an image from a file, a text or a weighted mix, from the command line.

The query is embedded with the same encoder loading as ``bindsearch embed`` and mixed exactly
as the service mixes search terms (``encoders.vectors.mix``: normalise each term, weight, sum,
normalise); the generator then turns the unit vector into a PNG.

    bindsearch generate --modality audio rain.wav -o rain.png
    bindsearch generate --text "a red ring in the snow" -o ring.png --seed 3
    bindsearch generate --mix "vision:dog.jpg" --mix "audio:rain.wav:0.5" -o mix.png

``--mix`` terms are ``MODALITY:VALUE[:WEIGHT]``: VALUE is a file path (a string for text);
WEIGHT (default 1, negative subtracts) is read from the last ``:`` only when it is a number,
so ``text:ratio 3:2`` needs its weight written out: ``text:ratio 3:2:1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from encoders import DEFAULT_MODEL
from encoders.cli import fail as _fail
from encoders.errors import EncoderError
from encoders.modality import Modality

if TYPE_CHECKING:
    from .generation import GeneratorInfo

MIX_SYNTAX = "MODALITY:VALUE[:WEIGHT], e.g. text:a dog:1.0 or audio:rain.wav:0.5"


@dataclass(frozen=True)
class QueryTerm:
    """One term of the query: a file path (or the text itself), its modality and weight."""

    modality: Modality
    value: str
    weight: float = 1.0


def parse_mix(spec: str) -> QueryTerm:
    """``MODALITY:VALUE[:WEIGHT]`` -> a term; ValueError (one line) for a bad one."""
    head, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"--mix {spec!r}: expected {MIX_SYNTAX}")
    modality = Modality.parse(head)
    value, weight = rest, 1.0
    if ":" in rest:
        body, _, tail = rest.rpartition(":")
        try:
            w = float(tail)
        except ValueError:
            w = None
        if w is not None and body:
            if not math.isfinite(w):
                raise ValueError(f"--mix {spec!r}: the weight must be a finite number")
            value, weight = body, w
    return QueryTerm(modality, value, weight)


def generate_image(
    terms: list[QueryTerm],
    output: Path,
    checkpoint: Path | None = None,
    config: str | None = None,
    generator: str | None = None,
    seed: int = 0,
    steps: int | None = None,
    device: str = "cpu",
    official: bool = False,
) -> GeneratorInfo:
    """Embed ``terms``, mix them like the service, generate one image, write it as PNG.

    ``config``/``checkpoint``: see ``encoders.resolve_model`` (None: the default model).
    ``generator``: "demo", a demo-decoder ``.safetensors``, "unclip", or a Stable unCLIP
    directory / hub id; default "demo" when the model has a demo decoder
    (``ModelRef.decoder``), "unclip" otherwise. Returns the generator's info.
    """
    import numpy as np

    from encoders import load_encoder, resolve_model
    from encoders.vectors import mix

    from .load import load_named_generator

    if not terms:
        raise ValueError("nothing to generate from: give --modality, --text or --mix")
    for t in terms:
        if t.modality is not Modality.TEXT and not Path(t.value).is_file():
            raise ValueError(f"{t.modality.value} file {t.value} does not exist")
        if t.modality is Modality.TEXT and not t.value.strip():
            raise ValueError("the text is empty")
    ref = resolve_model(config, checkpoint)
    spec = generator or ("demo" if ref.decoder is not None else "unclip")
    wanted = list(dict.fromkeys(t.modality for t in terms))
    enc = load_encoder(ref, device=device, modalities=wanted)
    vectors = np.stack(
        [enc.embed_items(t.modality, [t.value], official=official)[0] for t in terms]
    )
    query = mix(vectors, [t.weight for t in terms])
    gen = load_named_generator(spec, enc.dim, device, ref.sha256, ref.decoder)
    [img] = gen.generate(query[None], seed=seed, steps=steps)
    output.parent.mkdir(parents=True, exist_ok=True)
    img.save(output, "PNG")
    return gen.info


def generate(
    output: Annotated[Path, typer.Option("-o", "--output", help="The PNG to write.")],
    modality: Annotated[
        tuple[str, str] | None,
        typer.Option(
            "--modality", "-m", metavar="MODALITY ITEM", help="One file and its modality."
        ),
    ] = None,
    text: Annotated[str | None, typer.Option("--text", help="A text query.")] = None,
    mix: Annotated[
        list[str] | None,
        typer.Option("--mix", metavar="SPEC", help=f"A weighted term (repeat): {MIX_SYNTAX}."),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Same query and seed, same image.")] = 0,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Denoising steps (default: the generator's).")
    ] = None,
    generator: Annotated[
        str | None,
        typer.Option(
            help="demo (shipped with the demo weights), a demo-decoder .safetensors, unclip "
            "(Stable unCLIP, the `generate` extra; needs imagebind_huge), or a Stable unCLIP "
            "directory or hub id. Default: demo when the model ships a demo decoder, unclip "
            "otherwise."
        ),
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help=".pth or .safetensors weights.")] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help=f"Preset name or JSON config of the checkpoint (default: {DEFAULT_MODEL})."
        ),
    ] = None,
    official: Annotated[
        bool, typer.Option("--official", help="Reproduce the official preprocessing bit for bit.")
    ] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Generate an image from a file, a text, or a weighted mix of terms."""
    given = sum(x is not None and x != [] for x in (modality, text, mix))
    if given != 1:
        _fail("give exactly one of --modality MODALITY ITEM, --text STR or --mix SPEC...")
    if output.suffix.lower() != ".png":
        _fail(f"-o {output}: the output is a PNG file; name it *.png")
    try:
        if modality is not None:
            terms = [QueryTerm(Modality.parse(modality[0]), modality[1])]
        elif text is not None:
            terms = [QueryTerm(Modality.TEXT, text)]
        else:
            terms = [parse_mix(s) for s in mix or []]
        info = generate_image(
            terms, output, checkpoint, config, generator, seed, steps, device, official
        )
    except (EncoderError, ValueError, KeyError, OSError) as e:
        _fail(str(e).strip("'\""))
    typer.echo(
        f"wrote {output} ({info.image_size}x{info.image_size}, {info.name}, seed {seed}); "
        f"licence of the generator's weights: {info.licence}",
        err=True,
    )
