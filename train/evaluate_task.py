"""``omnimask eval TASK``: a model directory's task head on shards (or, for ``generate``,
its CM3 drawing images from captions), as the metrics JSON ``{"task", "split", "n",
"metrics", "model", "data", "device"}``; and the table it prints."""

from __future__ import annotations

import re
from pathlib import Path

from omnimask.errors import OmnimaskError

from .tasks.base import TASKS, task_for


def split_name(paths: list[str]) -> str:
    """The split shard names say (``val-000000.tar`` -> ``val``), or ``custom``."""
    names = {re.sub(r"-\d+\.tar$", "", Path(p).name) for p in paths}
    return names.pop() if len(names) == 1 else "custom"


def evaluate_model(task: str, model_dir: str, data: list[str], split: str | None = None,
                   limit: int | None = None, examples: str | None = None,
                   progress: bool = True, settings: dict | None = None,
                   corpora: dict | None = None, device: str = "auto") -> dict:
    """``corpora``: a caller's memo of the corpora built so far, keyed by shards and
    tokenizer fingerprints, so that several models with one set of tokenizers tokenise
    the data once. ``device``: where the model runs (auto: a CUDA GPU when there is one;
    the tokenizers and metrics stay on the CPU)."""
    import torch

    import omnimask

    from .corpus import build_corpus, tokenizer_id
    from .data.shards import expand_shards
    from .trainer import device_problem

    if task not in TASKS and task != "generate":
        raise OmnimaskError(f"unknown task {task!r}; known: {', '.join(TASKS.names())}, "
                            f"generate")
    if limit is not None and limit < 1:
        raise OmnimaskError(f"--limit must be >= 1, got {limit}")
    problem = device_problem(device)
    if problem:
        raise OmnimaskError(f"--device {problem}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = omnimask.load(model_dir).to(device)
    t = None if task == "generate" else task_for(model, task, where=str(model_dir),
                                                 settings=settings)
    toks = model.tokenizers or {}
    if "text" not in toks or "image" not in toks:
        raise OmnimaskError(f"{model_dir} carries no text and image tokenizers")
    paths = expand_shards(data)
    corpus = key = None
    dirs = getattr(model, "tokenizer_dirs", None) or {}
    if corpora is not None and dirs:  # fingerprints only when a memo is kept
        key = (tuple(paths), tuple(sorted((k, tokenizer_id(v)) for k, v in dirs.items())))
        corpus = corpora.get(key)
    if corpus is None:
        corpus = build_corpus(paths, toks["text"], toks["image"], toks.get("speech"),
                              progress=progress)
        if key is not None:
            corpora[key] = corpus
    model.eval()
    ex = Path(examples) if examples else None
    if t is None:  # images drawn from captions, judged (not a fine-tuning task)
        from .evaluate_generate import generation_metrics

        metrics = generation_metrics(model, corpus, limit, ex, settings, progress)
    else:
        metrics = t.evaluate(model, corpus, limit, ex)
    n = len(corpus) if limit is None else min(limit, len(corpus))
    return {"task": task, "split": split or split_name(paths), "n": n, "metrics": metrics,
            "model": str(model_dir), "data": [str(p) for p in paths], "device": device}


def metrics_table(result: dict) -> str:
    """``metric | value`` rows (nested ones such as VQA's ``per_type`` as ``per_type.color``)."""
    rows = []

    def walk(prefix: str, v) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, (int, float)):
            rows.append((prefix, f"{v:.4f}" if isinstance(v, float) else str(v)))

    walk("", result["metrics"])
    w = max([len(k) for k, _ in rows] + [6])
    head = f"{result['task']} on {result['split']} ({result['n']} images), {result['model']}"
    return "\n".join([head, f"{'metric':<{w}}  value", f"{'-' * w}  -----",
                      *(f"{k:<{w}}  {v}" for k, v in rows)])
