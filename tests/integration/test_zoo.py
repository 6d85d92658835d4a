"""The zoo end to end against a real HTTP server on 127.0.0.1: publish -> download ->
load, the cache, tampering, cut transfers, concurrent processes, offline mode, hostile
files. Nothing in the download path is mocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from unit.test_model_boundary import _packed, _tiny

import omnimask
from omnimask import zoo
from omnimask.safeio import UnreadableFile, safe_extract
from omnimask.zoo.fetch import DownloadError, entry_dir
from omnimask.zoo.publish import publish

from .zoo_server import ZooServer

NAME = "test/tiny-vqa"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def zoo_env(tmp_path, monkeypatch):
    """A published tiny VQA model served over HTTP; the user's manifest is the server's
    URL and the cache a fresh folder. Yields (server, model, cache)."""
    model = _tiny(heads={"vqa": {"num_answers": 3, "answers": ["red", "blue", "two"]}}).eval()
    src = model.save_pretrained(tmp_path / "src")
    publish(src, NAME, tmp_path / "served", description="a test model", license="MIT",
            recipe={"command": "a test"})
    cache = tmp_path / "cache"
    monkeypatch.setenv("OMNIMASK_HOME", str(cache))
    monkeypatch.delenv("OMNIMASK_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    zoo._REMOTE.clear()
    with ZooServer(tmp_path / "served") as server:
        monkeypatch.setenv("OMNIMASK_ZOO", f"{server.url}/manifest.json")
        yield server, model, cache
    zoo._REMOTE.clear()


def _outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    b = _packed(model.cfg)
    with torch.no_grad():
        return model.encoder(b["packed"]), model(b, task="vqa")["logits"]


WEIGHTS = f"{NAME}/model.safetensors"


def test_publish_download_load_gives_identical_outputs_and_then_hits_the_cache(zoo_env):
    server, model, cache = zoo_env
    e = zoo.entry(NAME)
    assert e.tasks == ("vqa",) and e.architecture == "custom" and e.license == "MIT"
    assert {f.path for f in e.files} == {"config.json", "model.safetensors", "omnimask_vocab.json",
                                         "README.md"}
    loaded = omnimask.load(NAME).eval()
    for a, b in zip(_outputs(model), _outputs(loaded), strict=True):
        assert torch.equal(a, b)
    assert server.gets(WEIGHTS) == [None]
    n = len(server.log)
    again = omnimask.load(NAME)
    assert len(server.log) == n  # a cache hit: not one request, not even the manifest
    assert torch.equal(again.encoder.trunk.tok.weight, model.encoder.trunk.tok.weight)
    assert sorted(p.name for p in (cache / "zoo" / ".partial").iterdir()) == []


@pytest.mark.parametrize("tamper", ["flip", "shorter", "longer"])
def test_a_tampered_file_names_both_hashes_and_is_not_cached(zoo_env, tmp_path, tamper):
    server, _, cache = zoo_env
    served = tmp_path / "served" / WEIGHTS
    expected = zoo.entry(NAME).files
    sha = next(f.sha256 for f in expected if f.path == "model.safetensors")
    data = bytearray(served.read_bytes())
    if tamper == "flip":
        data[-1] ^= 0xFF  # same size, one byte
    elif tamper == "shorter":
        data = data[:-100]
    else:
        data += b"\0" * 100
    served.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match=rf"model.safetensors of {NAME} .*SHA-256 "
                                            rf"[0-9a-f]{{64}} .*the manifest says {sha}"):
        omnimask.load(NAME)
    d = entry_dir(zoo.entry(NAME), cache)
    assert not (d / "model.safetensors").exists()
    assert list((cache / "zoo" / ".partial").iterdir()) == []


@pytest.mark.parametrize("ranges", [True, False], ids=["resumes", "restarts"])
def test_a_cut_transfer_leaves_no_file_and_the_next_call_completes_it(zoo_env, ranges):
    server, model, cache = zoo_env
    size = next(f.size for f in zoo.entry(NAME).files if f.path == "model.safetensors")
    server.cut[WEIGHTS] = size // 2
    server.ranges = ranges
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        omnimask.load(NAME)
    assert not (entry_dir(zoo.entry(NAME), cache) / "model.safetensors").exists()
    loaded = omnimask.load(NAME)
    gets = server.gets(WEIGHTS)
    assert len(gets) == 2 and gets[0] is None
    assert gets[1] is not None and gets[1].startswith("bytes=") and int(
        gets[1][6:].rstrip("-")) > 0  # the second asked for the rest
    assert torch.equal(loaded.encoder.trunk.tok.weight, model.encoder.trunk.tok.weight)


def _cli(args: list[str], env: dict, audit: bool = False) -> subprocess.Popen:
    """``omnimask ARGS`` in a fresh interpreter; with ``audit`` it prints how many sockets
    it opened (an audit hook on socket creation and connection) as its last line."""
    code = ("import sys\nn = []\n"
            "sys.addaudithook(lambda e, a: e in ('socket.__new__', 'socket.connect', "
            "'socket.getaddrinfo') and n.append(e))\n" if audit else "import sys\n")
    code += ("from omnimask.cli import main\nrc = main(sys.argv[1:])\n"
             + ("print('sockets', len(n))\n" if audit else "") + "sys.exit(rc)\n")
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_loading_at_once_transfer_once_and_both_load(zoo_env):
    server, _, _ = zoo_env
    server.delay = 0.1  # ~6 s for the weights: the two processes overlap
    code = ("import omnimask, torch; m = omnimask.load('" + NAME + "'); "
            "print(float(m.encoder.trunk.tok.weight.detach().double().sum()))")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert server.gets(WEIGHTS) == [None]  # one transfer
    want = float(zoo_env[1].encoder.trunk.tok.weight.detach().double().sum())
    assert [float(o.strip()) for o, _ in outs] == [want, want]  # both loaded the model


def test_offline_hits_the_cache_and_a_miss_fails_without_a_socket(zoo_env, tmp_path):
    server, _, cache = zoo_env
    omnimask.load(NAME)  # online once: the manifest and the files are cached
    n = len(server.log)
    env = dict(os.environ, OMNIMASK_OFFLINE="1")
    p = _cli(["zoo", "info", NAME], env, audit=True)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "(complete)" in out and out.splitlines()[-1] == "sockets 0", err
    p = _cli(["eval", "vqa", "--model", NAME, "--data", str(tmp_path / "none-*.tar")], env,
             audit=True)
    out, err = p.communicate(timeout=120)
    assert out.splitlines()[-1] == "sockets 0"
    assert f"{NAME} carries no text and image tokenizers" in err  # loaded, from the cache
    # a miss: another cache, offline; also the Hub's own switch and an hf:// name
    for extra, args in (({"OMNIMASK_OFFLINE": "1"}, ["zoo", "download", NAME]),
                        ({"HF_HUB_OFFLINE": "1"}, ["zoo", "download", NAME]),
                        ({"HF_HUB_OFFLINE": "1"}, ["eval", "vqa", "--model",
                                                   "hf://nobody/nothing", "--data", "x"])):
        env = {k: v for k, v in os.environ.items() if k != "OMNIMASK_OFFLINE"}
        env |= {"OMNIMASK_HOME": str(tmp_path / "empty"), **extra}
        p = _cli(args, env, audit=True)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2, err
        assert out.splitlines()[-1] == "sockets 0"
        assert len(err.strip().splitlines()) == 1 and "offline" in err.lower(), err
    assert len(server.log) == n


def test_a_pickle_served_as_weights_is_refused_not_run(zoo_env, tmp_path, plant_pickle):
    """A hostile publisher: the manifest's hash matches a pickle payload."""
    _, _, cache = zoo_env
    src = tmp_path / "hostile"
    _tiny().save_pretrained(src)
    marker = tmp_path / "pwned"
    plant_pickle(src / "model.safetensors", marker)
    publish(src, "test/hostile", tmp_path / "served")
    with pytest.raises(omnimask.errors.OmnimaskError, match="model.safetensors cannot be read"):
        omnimask.load("test/hostile")
    assert not marker.exists()


def _tar(path: Path, members: list[tuple[str, str]]) -> Path:
    """A tar of (name, kind) members: kind file, dir or symlink (to /etc/passwd)."""
    import io

    with tarfile.open(path, "w") as t:
        for name, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                t.addfile(info)
            else:
                data = b"x"
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("bad", ["/abs/file", "../outside", "a/../../outside", "link"])
def test_archive_extraction_refuses_escapes_and_links(tmp_path, bad):
    members = [("ok.txt", "file"), (bad, "symlink" if bad == "link" else "file")]
    arc = _tar(tmp_path / "a.tar", members)
    dest = tmp_path / "dest"
    with pytest.raises(UnreadableFile, match=f"{arc}: member .*nothing was extracted"):
        safe_extract(arc, dest)
    assert not dest.exists() and not (tmp_path / "outside").exists()
    ok = safe_extract(_tar(tmp_path / "b.tar", [("d/ok.txt", "file")]), dest)
    assert ok == ["d/ok.txt"] and (dest / "d" / "ok.txt").read_bytes() == b"x"


def test_an_archive_entry_unpacks_and_a_hostile_one_is_not_kept(zoo_env, tmp_path):
    """A manifest file with ``extract: true``: a tar of a model directory."""
    server, model, cache = zoo_env
    served = tmp_path / "served"
    src = tmp_path / "src"
    for name, members in (("test/packed", [(p.name, "file") for p in src.iterdir()]),
                          ("test/evil", [("../evil", "file")])):
        arc = served / f"{name.split('/')[1]}.tar"
        if name == "test/packed":
            with tarfile.open(arc, "w") as t:
                for p in src.iterdir():
                    t.add(p, arcname=p.name)
        else:
            _tar(arc, members)
        from omnimask.safeio import sha256_file

        doc = json.loads((served / "manifest.json").read_text())
        doc["models"].append({"name": name, "files": [
            {"path": arc.name, "url": arc.name, "sha256": sha256_file(arc),
             "size": arc.stat().st_size, "extract": True}]})
        (served / "manifest.json").write_text(json.dumps(doc))
    zoo._REMOTE.clear()
    loaded = omnimask.load("test/packed")
    assert torch.equal(loaded.encoder.trunk.tok.weight, model.encoder.trunk.tok.weight)
    with pytest.raises(UnreadableFile, match="evil.tar: member '../evil'"):
        omnimask.load("test/evil")
    d = entry_dir(zoo.entry("test/evil"), cache)
    assert not (d / "evil.tar").exists() and not (d.parent / "evil").exists()


def test_hub_mixin_round_trip_writes_a_model_card(tmp_path):
    from omnimask.model import OmniModel

    model = _tiny(heads={"vqa": {"num_answers": 5}}).eval()
    d = model.save_pretrained(tmp_path / "m")
    assert "library_name: omnimask" in (d / "README.md").read_text()
    back = OmniModel.from_pretrained(d).eval()
    for a, b in zip(_outputs(model), _outputs(back), strict=True):
        assert torch.equal(a, b)
    model.save_pretrained(d)  # a model directory is overwritten in place
    with pytest.raises(omnimask.errors.OmnimaskError, match="not a model directory"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("mine")
        model.save_pretrained(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_a_shipped_model_lists_and_evaluates_by_name(shapes_dir, tmp_path, monkeypatch, capsys):
    """A fresh clone: the repository's zoo/ manifest, downloaded from its own files."""
    monkeypatch.setenv("OMNIMASK_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("OMNIMASK_ZOO", raising=False)
    shipped = zoo.entries()
    assert zoo.builtin_manifest() == REPO / "zoo" / "manifest.json"
    vqa = [n for n, e in shipped.items() if "vqa" in e.tasks]
    assert vqa, "the repository ships no VQA model"
    from omnimask.cli import main

    out = tmp_path / "eval.json"
    assert main(["zoo", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(n in listed for n in shipped) and "vqa accuracy" in listed
    assert main(["eval", "vqa", "--model", vqa[0], "--data", str(shapes_dir / "test-novel-*.tar"),
                 "--limit", "8", "--out", str(out), "-q"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 8 and 0.0 <= result["metrics"]["accuracy"] <= 1.0


def test_cli_publish_fp16_then_load_from_a_local_manifest(tmp_path, monkeypatch, capsys):
    """``zoo publish --dtype float16`` into a folder; a path manifest with relative URLs."""
    from omnimask.cli import main

    model = _tiny(heads={"vqa": {"num_answers": 3}}).eval()
    src = model.save_pretrained(tmp_path / "src")
    out = tmp_path / "myzoo"
    assert main(["zoo", "publish", str(src), "--name", "me/tiny-half", "--to", str(out),
                 "--dtype", "float16", "--description", "half"]) == 0
    assert "published me/tiny-half" in capsys.readouterr().out
    doc = json.loads((out / "manifest.json").read_text())
    [e] = doc["models"]
    assert e["recipe"]["weights_dtype"] == "float16" and e["description"] == "half"
    assert all(f["url"] == f"me/tiny-half/{f['path']}" for f in e["files"])
    monkeypatch.setenv("OMNIMASK_ZOO", str(out / "manifest.json"))
    monkeypatch.setenv("OMNIMASK_HOME", str(tmp_path / "cache"))
    half = omnimask.load("me/tiny-half").eval()
    for a, b in zip(_outputs(model), _outputs(half), strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)  # fp16 weights, fp32 maths
    assert main(["zoo", "info", "me/tiny-half", "--files"]) == 0
    info = capsys.readouterr().out
    assert "(complete)" in info and "model.safetensors" in info


def test_shared_files_are_stored_once_and_survive_republishing(tmp_path, monkeypatch):
    model = _tiny(heads={"vqa": {"num_answers": 3}})
    a = model.save_pretrained(tmp_path / "a")
    model.add_head("vqa", {"num_answers": 4})  # another head, same encoder files around it
    b = model.save_pretrained(tmp_path / "b")
    out = tmp_path / "z"
    publish(a, "me/a", out)
    eb = publish(b, "me/b", out)
    assert next(f.url for f in eb.files if f.path == "omnimask_vocab.json") == "me/a/omnimask_vocab.json"
    assert not (out / "me" / "b" / "omnimask_vocab.json").exists()
    publish(a, "me/a", out)  # again: its files stay where me/b finds them
    monkeypatch.setenv("OMNIMASK_ZOO", str(out / "manifest.json"))
    monkeypatch.setenv("OMNIMASK_HOME", str(tmp_path / "cache"))
    assert omnimask.load("me/b").heads["vqa"].cfg.num_answers == 4
    assert {"me/a", "me/b"} <= set(zoo.entries())  # beside the shipped ones


def test_a_pretraining_run_publishes_its_validation_losses(tmp_path):
    run = tmp_path / "run"
    _tiny().save_pretrained(run / "model")
    (run / "summary.json").write_text(json.dumps({"step": 30, "train_seconds": 12.5, "val": {
        "mlm": {"step0": 7.0, "final": 2.5, "ratio": 0.357}}}))
    e = publish(run, "me/pre", tmp_path / "z")
    assert e.tasks == ("encoder",) and e.recipe["step"] == 30
    assert e.metrics == ({"task": "pretrain", "split": "val",
                          "metrics": {"mlm_loss": 2.5, "mlm_ratio": 0.357}},)
    assert e.headline() == "pretrain mlm_loss 2.500 (val)"
