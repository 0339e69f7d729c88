"""``python -m bindsearch``: the same command line as the ``bindsearch`` console script."""

from .cli import main

main()
