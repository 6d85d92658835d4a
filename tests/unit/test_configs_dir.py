"""Every YAML under configs/ loads against its schema (unknown keys would fail)."""

from pathlib import Path

import pytest

from omnimask.config import ConfigError, DataConfig, DemoConfig, load_config
from omnimask.train.pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parents[2] / "configs"
SCHEMAS = {"demo": DemoConfig, "data": DataConfig, "pretrain": PretrainConfig}


@pytest.mark.parametrize("path", sorted(ROOT.glob("*/*.yaml")), ids=lambda p: p.name)
def test_config_file_loads(path):
    cfg = load_config(SCHEMAS[path.parent.name], path)
    assert isinstance(cfg, SCHEMAS[path.parent.name])


def test_pretrain_config_rejects_unknown_and_mistyped_keys():
    tiny = ROOT / "pretrain" / "shapes_tiny.yaml"
    with pytest.raises(ConfigError, match="trainer.max_stepz"):
        load_config(PretrainConfig, tiny, ["trainer.max_stepz=3"])
    with pytest.raises(ConfigError, match="model.trunk.dim"):
        load_config(PretrainConfig, tiny, ["model.trunk.dim=big"])
    with pytest.raises(ConfigError, match="trainer.precision"):
        load_config(PretrainConfig, tiny, ["trainer.precision=fp8"])
    cfg = load_config(PretrainConfig, tiny, ["objectives.mix.cm3=0", "trainer.lr=1e-4"])
    assert cfg.objectives.mix["cm3"] == 0 and cfg.trainer.lr == 1e-4
    assert cfg.model.trunk.dim == 128 and cfg.objectives.mlm_whole_word
