"""The demo world: latent factors rendered as every modality, in memory or as files.

Depends on ``encoders`` only, so ``train`` (the demo model and decoder are trained on it) and
``service`` (the demo index a fresh service builds) can both use it.

    from world import write_demo_world
    manifest = write_demo_world(Path("demo"), n=120, seed=0, split="test")
"""

from .world import World, generate, write_demo_world, write_world

__all__ = ["World", "generate", "write_demo_world", "write_world"]
