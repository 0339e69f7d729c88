"""The ``bindsearch`` command line: one root, sub-commands from each package.

Commands are plain typed functions in their own packages; this module only mounts them. It is
the one module that may import every package (README, "Layout").
"""

from __future__ import annotations

import typer

from encoders.cli import weights_app
from encoders.embed_cli import embed
from evaluation.cli import eval_cmd
from generate.cli import generate
from service.serve_cli import NO_FAISS, serve
from train.cli import demo_app, train
from train.decoder import train_decoder_cmd

index_app: typer.Typer | None
try:
    from index.cli import index_app
except ImportError as e:  # faiss comes from an extra; `embed` and `weights` work without it
    if "faiss" not in str(e):
        raise
    index_app = None

app = typer.Typer(
    name="bindsearch",
    help="Any-to-any search in one ImageBind embedding space.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(weights_app, name="weights")
if index_app is not None:
    app.add_typer(index_app, name="index")
else:

    @app.command(
        "index", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
    )
    def _index_without_faiss() -> None:
        """Build and query indexes (needs FAISS: not installed)."""
        typer.echo(f"error: {NO_FAISS}", err=True)
        raise typer.Exit(1)


app.command("embed")(embed)
app.command("eval")(eval_cmd)
app.command("serve")(serve)
app.command("generate")(generate)
app.add_typer(demo_app, name="demo")
app.command("train")(train)
app.command("train-decoder")(train_decoder_cmd)


def main() -> None:
    """Console-script entry point."""
    app()
