"""The entry points: ``omnimask export``, ``omnimask list``, ``--version``, ``--print-config``,
``--config NAME`` for packaged configs, and the dependency rule that nothing imports the
demo or the CLI (ShapesWorld preparation lives below both)."""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import omnimask
from omnimask.cli import main
from omnimask.config import DemoConfig, load_config, packaged_configs
from omnimask.registry import HEADS, PROCESSORS, TOKENIZERS
from omnimask.train.pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = {"omnimask": ROOT / "omnimask", "omnimask.modalities": ROOT / "modalities",
                "omnimask.fusion": ROOT / "fusion", "omnimask.heads": ROOT / "heads",
                "omnimask.train": ROOT / "train"}
VQ_TINY = ["vq.quantizer=vq", "vq.downsample=3", "crop=0", "vq.channels=[8,8,8]",
           "vq.codebook_size=16", "vq.code_dim=4", "batch_size=4",
           "warmup_steps=0", "max_images=16", "max_steps=1"]


def _one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("omnimask: error:") and "\n" not in err, err
    for n in names:
        assert n in err, (n, err)
    return err


# -- --version, list ---------------------------------------------------------------------------
def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"omnimask {importlib.metadata.version('omnimask')}"


@pytest.mark.parametrize("what,names", [
    ("models", omnimask.list_models),
    ("objectives", lambda: __import__("omnimask.train.objectives.base",
                                      fromlist=["OBJECTIVES"]).OBJECTIVES.names()),
    ("processors", PROCESSORS.names), ("tokenizers", TOKENIZERS.names), ("heads", HEADS.names),
    ("configs", packaged_configs)])
def test_list_prints_the_registry_names(what, names, capsys):
    assert main(["list", what]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == names() and printed  # one name a line, every one


def test_list_of_something_unknown_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["list", "optimizers"])
    assert e.value.code == 2 and "invalid choice: 'optimizers'" in capsys.readouterr().err


# -- --print-config and packaged configs -------------------------------------------------------
@pytest.mark.parametrize("name", ["shapes_tiny", "pretrain/shapes_tiny",
                                  "pretrain/shapes_tiny.yaml", "configs/pretrain/shapes_tiny.yaml",
                                  str(ROOT / "configs" / "pretrain" / "shapes_tiny.yaml")])
def test_pretrain_print_config_resolves_and_runs_nothing(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a packaged name, not a file beside the command
    run = tmp_path / "run"
    assert main(["pretrain", "--config", name, "--out", str(run), "--print-config",
                 "trainer.max_steps=7", "objectives.mix.cm3=0"]) == 0
    printed = capsys.readouterr().out
    assert not run.exists() and list(tmp_path.iterdir()) == []  # nothing written
    cfg = yaml.safe_load(printed)
    assert cfg["out"] == str(run) and cfg["trainer"]["max_steps"] == 7
    assert cfg["objectives"]["mix"]["cm3"] == 0 and cfg["model"]["trunk"]["dim"] == 128
    # the printed YAML is the resolved config: loading it gives the same config back
    (tmp_path / "printed.yaml").write_text(printed)
    again = load_config(PretrainConfig, tmp_path / "printed.yaml")
    assert again == load_config(PretrainConfig, "shapes_tiny",
                                ["trainer.max_steps=7", "objectives.mix.cm3=0"], out=str(run))


def test_demo_print_config(tmp_path, capsys):
    assert main(["demo", "--config", "demo/default", "--print-config", "--out",
                 str(tmp_path / "d"), "num_train=300"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    want = load_config(DemoConfig, ROOT / "configs" / "demo" / "default.yaml", ["num_train=300"],
                       out=str(tmp_path / "d"))
    assert cfg == dataclasses.asdict(want) and cfg["num_train"] == 300
    assert not (tmp_path / "d").exists()


def test_a_file_comes_before_a_packaged_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("shapes_tiny").write_text("trainer:\n  max_steps: 11\n")  # a file of that name
    assert main(["pretrain", "--config", "shapes_tiny", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["max_steps"] == 11 and cfg["model"]["trunk"]["dim"] != 128


@pytest.mark.parametrize("name", ["shapes_tinny", "pretrain/default", "../configs/shapes_tiny"])
def test_unknown_config_name_lists_the_packaged_ones(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--config", name, "--print-config"]) == 2
    _one_line_error(capsys, f"config file not found: {name}",
                    "nor a packaged config: data/shapesworld, demo/default, finetune/shapes_tasks, "
                    "pretrain/shapes_tiny")


# -- export ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(small_shards, tmp_path_factory):
    """A 4-step MLM run (checkpoints and validation at steps 2 and 4, EMA kept)."""
    d = tmp_path_factory.mktemp("export_run")
    train = str(small_shards / "train-*.tar")
    TOKENIZERS.get("text").train([train], str(d / "text"), progress=False)
    TOKENIZERS.get("image").train([train], str(d / "image"), VQ_TINY, progress=False)
    mix = dict.fromkeys(["itm", "mrfr", "mrc", "mim", "itc", "cm3", "speech"], 0) | {"mlm": 1}
    cfg = {"data": {"train": [train], "val": [train], "val_batches": 1, "val_batch_size": 4},
           "tokenizers": {"text": str(d / "text"), "image": str(d / "image")},
           "model": {"trunk": {"dim": 16, "layers": 1, "heads": 2, "ffn_dim": 32}},
           "objectives": {"mix": mix},
           "trainer": {"max_steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 2,
                       "checkpoint_every": 2, "ema": 0.5, "tensorboard": False,
                       "device": "cpu"}}
    (d / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["pretrain", "--config", str(d / "tiny.yaml"), "--out", str(d / "run"),
                 "-q"]) == 0
    return d / "run"


def test_export_final_best_step_and_ema(tiny_run, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "final"
    assert main(["export", str(tiny_run), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out)  # the directory last, what it holds above it
    listed = " ".join(lines[:-1])
    for name in ("config.json", "model.safetensors", "omnimask_vocab.json", "tokenizers/"):
        assert name in listed, name
    assert "(image, text)" in listed
    model = omnimask.load(out)
    assert model.cfg.trunk.dim == 16 and sorted(model.tokenizer_dirs) == ["image", "text"]

    final = load_file(out / "model.safetensors")
    for which in ("best", "2", "step_00000002"):
        assert main(["export", str(tiny_run), "--out", str(tmp_path / which), "--which",
                     which]) == 0
    step2 = load_file(tmp_path / "2" / "model.safetensors")
    assert step2.keys() == final.keys()
    assert any(not torch.equal(step2[k], final[k]) for k in final)  # another checkpoint
    named = load_file(tmp_path / "step_00000002" / "model.safetensors")
    assert all(torch.equal(named[k], step2[k]) for k in step2)
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "ema"), "--ema"]) == 0
    ema = load_file(tmp_path / "ema" / "model.safetensors")
    assert any(not torch.equal(ema[k], final[k]) for k in final)  # the average, not the live
    capsys.readouterr()
    # an earlier export is overwritten in place
    assert main(["export", str(tiny_run), "--out", str(out), "--which", "2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(again[k], step2[k]) for k in step2)


def test_export_bad_input_is_one_line(tiny_run, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")]) == 2
    _one_line_error(capsys, "is not a pretraining run directory (no config.yaml)")
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "m"), "--which", "3"]) == 2
    _one_line_error(capsys, "no complete checkpoint '3'", "step_00000002, step_00000004")
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert main(["export", str(tiny_run), "--out", str(keep)]) == 2
    _one_line_error(capsys, f"{keep} exists and is not a model directory")
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["export", str(tiny_run), "--out", str(f / "sub")]) == 2
    _one_line_error(capsys, "--out", f"{f} is a file")
    assert not (tmp_path / "m").exists()


# -- dependencies point down -------------------------------------------------------------------
def _imports(path: Path, module: str) -> set[str]:
    """The absolute names of the modules ``path`` (module ``module``) imports."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            name = ".".join([*base, node.module] if node.module else base)
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)
    return found


def _modules():
    for pkg, d in PACKAGE_DIRS.items():
        for path in sorted(d.rglob("*.py")):
            rel = path.relative_to(d).with_suffix("").parts
            rel = rel[:-1] if rel[-1] == "__init__" else rel
            yield path, ".".join([pkg, *rel])


def test_nothing_imports_the_demo_or_the_cli():
    seen = 0
    for path, module in _modules():
        seen += 1
        names = _imports(path, module)
        if not module.startswith("omnimask.cli"):
            assert not any(n == "omnimask.cli" or n.startswith("omnimask.cli.") for n in names), \
                module
        if module != "omnimask.cli.demo":
            assert "omnimask.demo" not in names, module
    assert seen > 50
    # the check sees relative imports: the CLI's demo module is found importing the demo
    assert "omnimask.demo" in _imports(ROOT / "omnimask" / "cli" / "demo.py", "omnimask.cli.demo")


def test_no_package_file_is_found_relative_to_the_source():
    """Files next to the source are gone in an installed wheel: importlib.resources it is."""
    for path, module in _modules():
        assert "__file__" not in path.read_text(), module


def test_prepare_shapes_uses_the_shared_preparation(tmp_path, monkeypatch):
    from omnimask.train import pretrain
    from omnimask.train.data.shapesworld import prepare

    calls = []
    monkeypatch.setattr(prepare, "generate_splits", lambda *a, **k: calls.append(("data", a, k)))
    monkeypatch.setattr(prepare, "train_tokenizers",
                        lambda *a, **k: calls.append(("tokenizers", a, k)))
    run = tmp_path / "demo"
    cfg = load_config(PretrainConfig, "shapes_tiny", [
        f"data.train=[{run / 'data' / 'train-*.tar'}]", f"data.val=[{run / 'data' / 'val-*.tar'}]",
        f"tokenizers.text={run / 'tokenizers' / 'text'}",
        f"tokenizers.image={run / 'tokenizers' / 'image'}",
        f"tokenizers.speech={run / 'tokenizers' / 'speech'}"])
    pretrain.prepare_shapes(cfg, progress=False)
    (_, (data_out, sizes), dk), (_, (tok_data, tok_out), tk) = calls
    d = DemoConfig()  # the demo's defaults: the same data and tokenizers as `omnimask demo`
    assert data_out == run / "data" and tok_data == run / "data"
    assert tok_out == run / "tokenizers"
    assert sizes == {"train": d.num_train, "val": d.num_val, "test": d.num_test,
                     "test-novel": d.num_test_novel}
    assert dk["seed"] == d.seed and dk["shard_size"] == d.shard_size
    assert tk["speech_units"] == d.speech_units and tk["vq_steps"] == d.vq_steps
    assert tk["vq_codes"] == d.vq_codes and tk["vq_crop"] == d.vq_crop
    assert tk["vq_depth"] == d.vq_depth == 4  # residual levels: the demo's image tokens
    assert tk["vq_precision"] == d.precision
