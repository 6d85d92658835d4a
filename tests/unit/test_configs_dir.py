"""Every YAML under configs/ loads against its schema (unknown keys would fail)."""

from pathlib import Path

import pytest

from omnimask.config import DataConfig, DemoConfig, load_config

ROOT = Path(__file__).resolve().parents[2] / "configs"
SCHEMAS = {"demo": DemoConfig, "data": DataConfig}


@pytest.mark.parametrize("path", sorted(ROOT.glob("*/*.yaml")), ids=lambda p: p.name)
def test_config_file_loads(path):
    cfg = load_config(SCHEMAS[path.parent.name], path)
    assert isinstance(cfg, SCHEMAS[path.parent.name])
