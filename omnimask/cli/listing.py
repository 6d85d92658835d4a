"""``omnimask list WHAT``: the names each registry knows, one a line."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _models() -> list[str]:
    from .. import list_models

    return list_models()


def _objectives() -> list[str]:
    from ..train.objectives.base import OBJECTIVES

    return OBJECTIVES.names()


def _registry(name: str) -> Callable[[], list[str]]:
    def names() -> list[str]:
        from .. import registry

        return getattr(registry, name).names()
    return names


def _configs() -> list[str]:
    from ..config import packaged_configs

    return packaged_configs()


LISTS: dict[str, Callable[[], list[str]]] = {
    "models": _models, "objectives": _objectives, "processors": _registry("PROCESSORS"),
    "tokenizers": _registry("TOKENIZERS"), "heads": _registry("HEADS"), "configs": _configs}


def cmd_list(a: argparse.Namespace) -> int:
    for name in LISTS[a.what]():
        print(name)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    ls = sub.add_parser("list", help="what the registries know: models, objectives, ...",
                        description="Print the names of the model variants (create_model), "
                                    "pretraining objectives, modality processors, tokenizer "
                                    "kinds, task heads or packaged configs (--config NAME), "
                                    "one a line.")
    ls.add_argument("what", choices=list(LISTS), help="which names")
    ls.set_defaults(fn=cmd_list)
