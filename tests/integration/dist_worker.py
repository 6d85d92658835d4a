"""A tiny masked-LM trunk trained through the one loop, launched alone or by torchrun
(tests/integration/test_distributed.py): ``python dist_worker.py RUN_DIR JSON_OVERRIDES``."""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from omnimask.fusion.packing import Segment, pack
from omnimask.fusion.trunk import Trunk, TrunkConfig
from omnimask.train.trainer import Trainer, TrainerConfig, step_seed

IGNORE = -100


class TinyMLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = Trunk(TrunkConfig(vocab_size=40, dim=32, heads=4, layers=3, ffn_dim=64,
                                       dropout=0.1, attention_backend="sdpa"))
        self.scale = torch.nn.Parameter(torch.tensor(0.1))  # 0-d, as ITC's logit scale

    def forward(self, batch):
        h = self.trunk(batch)
        pos = (batch.targets != IGNORE).nonzero().squeeze(1)
        logits = self.trunk.mlm_logits(h, pos) * self.scale.exp()
        return {"loss": F.cross_entropy(logits, batch.targets[pos]), "tokens": len(batch.ids)}


def make_batch(step: int, micro: int):
    """Variable-length samples, a pure function of (step, micro)."""
    g = torch.Generator().manual_seed(step_seed(5, step, micro))
    samples = []
    for _ in range(4):
        n = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(4, 40, (n,), generator=g)
        tgt = torch.full((n,), IGNORE)
        m = torch.rand(n, generator=g) < 0.3
        m[0] = True
        tgt[m] = ids[m]
        ids = ids.masked_fill(m, 3)
        samples.append([Segment("text", ids=ids, targets=tgt)])
    return "mlm", pack(samples)


def main(run: str, overrides: dict) -> None:
    torch.manual_seed(0)
    model = TinyMLM()
    cfg = TrainerConfig(**{"max_steps": 20, "lr": 3e-3, "warmup_steps": 3, "eval_every": 0,
                           "checkpoint_every": 10, "keep": 5, "tensorboard": False,
                           "device": "cpu", "threads": 1, **overrides})
    box = {}
    trainer = Trainer(cfg, run, model, make_batch,
                      lambda name, b: box["fwd"](b), progress=False)
    box["fwd"] = trainer.forward_model
    out = trainer.fit()
    if trainer.rank == 0:
        print(json.dumps({"summary": out, "world": trainer.world}))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
