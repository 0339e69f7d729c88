"""The ``bindsearch`` command line: one root, sub-commands from each package.

Commands are plain typed functions in their own packages; this module only mounts them.
"""

from __future__ import annotations

import typer

from encoders.cli import weights_app
from encoders.embed_cli import embed
from index.cli import index_app
from service.serve_cli import serve
from train.cli import demo_app, train

app = typer.Typer(
    name="bindsearch",
    help="Any-to-any search in one ImageBind embedding space.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(weights_app, name="weights")
app.add_typer(index_app, name="index")
app.command("embed")(embed)
app.command("serve")(serve)
app.add_typer(demo_app, name="demo")
app.command("train")(train)


def main() -> None:
    """Console-script entry point."""
    app()
