"""One registry per concept (processors, converters, models, ...), one way to look things up.

Entries are registered with a decorator and created by name; an unknown name raises an
error that lists what is available.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .errors import OmnimaskError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, concept: str, modules: tuple[str, ...] = ()) -> None:
        self.concept = concept
        self._entries: dict[str, T] = {}
        self._modules = modules  # imported on first lookup: their import registers entries
        self._loaded = not modules

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for m in self._modules:
                importlib.import_module(m)

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.concept} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise OmnimaskError(f"unknown {self.concept} {name!r}; known: {known}") from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# Modality processors: decoded sample -> model inputs for one modality (see omnimask.modalities).
PROCESSORS: Registry[Callable[..., Any]] = Registry("processor", ("omnimask.modalities",))
# Dataset converters: real datasets -> ShapesWorld-schema shards (see omnimask.train.data.convert).
CONVERTERS: Registry[Callable[..., Any]] = Registry("converter", ("omnimask.train.data.convert",))
# Tokenizers per modality: objects with train(data, out, overrides) and evaluate(tokenizer, data).
TOKENIZERS: Registry[Any] = Registry("tokenizer", ("omnimask.modalities.text.train",
                                                   "omnimask.modalities.speech.tokenizer",
                                                   "omnimask.modalities.image.tokenizer"))
# Named model variants (sizes as data): name -> () -> ModelConfig (see omnimask.variants).
MODELS: Registry[Callable[[], Any]] = Registry("model", ("omnimask.variants",))
# Task heads on the encoder: classes built as Head(model_cfg, head_cfg) (see omnimask.heads).
HEADS: Registry[Any] = Registry("head", ("omnimask.heads.vqa",
                                           "omnimask.heads.retrieval",
                                           "omnimask.heads.captioning",
                                           "omnimask.heads.segmentation"))
