"""The ``bindsearch`` command line, assembled from each package's commands (``bindsearch.cli``).

The only package that may import all the others.
"""

__all__: list[str] = []
