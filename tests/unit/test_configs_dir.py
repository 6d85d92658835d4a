"""Every YAML under configs/ loads against its schema (unknown keys would fail); the same
files ship in the package (``omnimask.configs``) and load by name from a built wheel."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from omnimask.config import (
    ConfigError,
    DataConfig,
    DemoConfig,
    find_config,
    load_config,
    packaged_config,
    packaged_configs,
)
from omnimask.train.finetune import FinetuneConfig, task_config
from omnimask.train.pretrain import PretrainConfig

REPO = Path(__file__).resolve().parents[2]
ROOT = REPO / "configs"
SCHEMAS = {"demo": DemoConfig, "data": DataConfig, "pretrain": PretrainConfig,
           "finetune": FinetuneConfig, "recipes": DemoConfig}


@pytest.mark.parametrize("path", sorted(ROOT.glob("*/*.yaml")), ids=lambda p: p.name)
def test_config_file_loads(path):
    cfg = load_config(SCHEMAS[path.parent.name], path)
    assert isinstance(cfg, SCHEMAS[path.parent.name])
    if isinstance(cfg, FinetuneConfig):  # each task's settings against its own schema
        for name, given in cfg.tasks.items():
            task_config(name, given)


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


# -- packaged configs --------------------------------------------------------------------------
def test_every_config_is_packaged_and_loads_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not found as files: the package's copies are read
    files = sorted(ROOT.glob("*/*.yaml"))
    assert packaged_configs() == [f"{p.parent.name}/{p.stem}" for p in files]
    for p in files:
        assert packaged_config(f"{p.parent.name}/{p.stem}").read_text() == p.read_text()
        for name in (p.stem, f"{p.parent.name}/{p.name}", f"configs/{p.parent.name}/{p.name}"):
            assert find_config(name).read_text() == p.read_text(), name
        assert load_config(SCHEMAS[p.parent.name], p.stem) == load_config(
            SCHEMAS[p.parent.name], p)


def test_unknown_packaged_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="no packaged config 'tiny'; packaged: data/shapes"):
        packaged_config("tiny")
    with pytest.raises(ConfigError, match=r"config file not found: \.\./x \(nor a packaged"):
        find_config("../x")  # names never leave the package


@pytest.mark.slow
def test_wheel_ships_every_module_and_config(omnimask_wheel, package_dirs, tmp_path):
    """An installed omnimask has its configs (``demo`` pretrains with shapes_tiny) and
    every module of the mapped folders (a package missing from pyproject.toml would not)."""
    wheel, PACKAGES = omnimask_wheel, package_dirs  # noqa: N806
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "omnimask/configs/pretrain/shapes_tiny.yaml" in names
    want = {f"{PACKAGES[folder]}/{p.relative_to(REPO / folder).as_posix()}"
            for folder in PACKAGES for p in (REPO / folder).rglob("*")
            if p.suffix in (".py", ".yaml", ".safetensors") and "__pycache__" not in p.parts}
    assert want - names == set()
    assert "omnimask/cli/__main__.py" in names and "omnimask/configs/demo/default.yaml" in names
    assert "omnimask/train/data/shapesworld/shape_judge.safetensors" in names
    shipped = {f"omnimask/zoo/shipped/{p.relative_to(REPO / 'zoo').as_posix()}"
               for p in (REPO / "zoo").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert shipped - names == set()  # the zoo's manifest and every model file it lists

    # the unpacked wheel, ahead of the editable install, away from the repository's configs/
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    run = subprocess.run([sys.executable, "-c", "import omnimask; print(omnimask.__file__)"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert run.stdout.strip() == str(site / "omnimask" / "__init__.py"), run.stderr
    run = subprocess.run([sys.executable, "-m", "omnimask.cli", "pretrain", "--config",
                          "shapes_tiny", "--print-config"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120, env={**os.environ, "PYTHONPATH": str(site)})
    assert run.returncode == 0, run.stderr
    assert "shapes_tiny" in run.stdout and "max_steps:" in run.stdout
    # the installed zoo: its manifest and models come from the wheel, not the checkout
    run = subprocess.run([sys.executable, "-m", "omnimask.cli", "zoo", "info",
                          "omnimask/shapes-tiny-vqa", "--files"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120, env={**os.environ, "PYTHONPATH": str(site)})
    assert run.returncode == 0, run.stderr
    assert str(site / "omnimask" / "zoo" / "shipped") in run.stdout


def test_the_demo_default_file_is_what_make_demo_runs():
    """`make demo` runs DemoConfig's defaults; configs/demo/default.yaml writes them out."""
    import dataclasses

    assert dataclasses.asdict(load_config(DemoConfig, ROOT / "demo" / "default.yaml")) == \
        dataclasses.asdict(DemoConfig())
