"""The processor interface shared by every modality.

A processor is registered in ``omnimask.registry.PROCESSORS`` as a factory
``make(cfg: DataConfig) -> fn(decoded: dict) -> dict``. ``decoded`` maps the sample's
member names (``"image.png"``) to decoded values; ``fn`` returns the model-side fields it
produces (``{"image": tensor}``). The factory's ``keys`` are the members it needs: the
reader treats a sample without them as bad.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omnimask.registry import PROCESSORS

ProcessFn = Callable[[dict[str, Any]], dict[str, Any]]


def register_processor(name: str, keys: tuple[str, ...]):
    def deco(factory: Callable[..., ProcessFn]) -> Callable[..., ProcessFn]:
        factory.keys = keys  # type: ignore[attr-defined]
        return PROCESSORS.register(name)(factory)

    return deco
