"""omnimask: multimodal masked foundation models (text, images, speech) on one packed trunk.

``omnimask.create_model(name)``, ``omnimask.list_models()`` and ``omnimask.load(dir)`` are
imported on first use (module ``__getattr__``): ``import omnimask`` stays cheap.
"""

__version__ = "0.1.0"

_LAZY = {"create_model": "omnimask.variants", "list_models": "omnimask.variants",
         "load": "omnimask.pretrained"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'omnimask' has no attribute {name!r}")
