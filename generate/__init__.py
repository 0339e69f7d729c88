"""Images from embeddings: the demo decoder and Stable unCLIP behind one interface.

Depends on ``encoders`` only (docs/generation.md).

    from generate import load_generator
    [img] = load_generator("demo").generate(vectors[:1], seed=0)
"""

from .generation import GeneratorInfo, ImageGenerator, check_embeddings
from .load import GENERATORS, check_generator_dim, load_generator, load_named_generator

__all__ = [
    "GENERATORS",
    "GeneratorInfo",
    "ImageGenerator",
    "check_embeddings",
    "check_generator_dim",
    "load_generator",
    "load_named_generator",
]
