"""Files the project loads never run code; checkpoints are verified and fall back; one run
per directory; metrics survive a torn line; a finished run rerun logs nothing twice."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from omnimask.runlock import RunDirectoryBusy, RunLock
from omnimask.safeio import UnreadableFile, load_tree, save_tree
from omnimask.train import checkpoint as ckpt
from omnimask.train.corpus import _fingerprint

from .test_trainer import _trainer


def test_the_payload_is_live(tmp_path, plant_pickle):
    """The attack works on a plain unpickler, so the tests below would catch a regression."""
    marker = tmp_path / "pwned"
    plant_pickle(tmp_path / "p.pkl", marker)
    pickle.loads((tmp_path / "p.pkl").read_bytes())  # noqa: S301 - the attack itself
    assert marker.exists()


def test_tree_file_refuses_a_pickle(tmp_path, plant_pickle):
    marker = tmp_path / "pwned"
    plant_pickle(tmp_path / "corpus-train.safetensors", marker)
    with pytest.raises(UnreadableFile, match="corpus-train.safetensors"):
        load_tree(tmp_path / "corpus-train.safetensors")
    assert not marker.exists()


def test_tree_round_trip_keeps_types(tmp_path):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))])
    opt.param_groups[0]["params"][0].grad = torch.ones(3, 2)
    opt.step()
    tree = {"opt": opt.state_dict(), "py": __import__("random").getstate(),
            "np": np.random.get_state(), "t": torch.arange(4), "none": None,
            "nested": [(1, 2.5, "a"), {"k": [torch.zeros(2, dtype=torch.float16)]}],
            "inf": float("inf")}
    save_tree(tmp_path / "s.safetensors", tree)
    back = load_tree(tmp_path / "s.safetensors")
    assert back["opt"]["state"].keys() == {0} and back["opt"]["param_groups"][0]["params"] == [0]
    torch.testing.assert_close(back["opt"]["state"][0]["exp_avg"], opt.state[
        opt.param_groups[0]["params"][0]]["exp_avg"])
    assert back["py"] == tree["py"] and isinstance(back["py"][1], tuple)
    assert back["np"][0] == "MT19937" and back["np"][1].dtype == np.uint32
    assert (back["np"][1] == tree["np"][1]).all()
    assert back["nested"][0] == (1, 2.5, "a") and back["nested"][1]["k"][0].dtype == torch.float16
    assert back["none"] is None and back["inf"] == float("inf")
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))])
    opt2.load_state_dict(back["opt"])  # an optimizer takes the state back


def test_old_pickle_checkpoint_is_refused_not_loaded(tmp_path, plant_pickle):
    marker = tmp_path / "pwned"
    old = tmp_path / "checkpoints" / "step_00000005"
    old.mkdir(parents=True)
    plant_pickle(old / "state.pt", marker)
    (old / "model.safetensors").write_bytes(b"")
    (old / ckpt.MARKER).write_text("5\n")  # the old marker format
    with pytest.raises(UnreadableFile, match="older omnimask.*pickle"):
        ckpt.load(old)
    t = _trainer(tmp_path)
    with pytest.raises(Exception, match="no checkpoint .* loads"):
        t.fit()
    assert not marker.exists()


def test_checkpoint_files_are_verified_and_the_previous_one_is_used(tmp_path, caplog):
    t = _trainer(tmp_path, max_steps=10)
    t.fit()
    done = ckpt.complete(tmp_path / "checkpoints")
    assert [p.name for p in done] == ["step_00000005", "step_00000010"]
    newest = done[-1]
    w = newest / ckpt.WEIGHTS
    orig = w.read_bytes()
    buf = bytearray(orig)
    buf[-3] ^= 0x01  # one bit of a weight
    w.write_bytes(bytes(buf))
    with pytest.raises(UnreadableFile, match="model.safetensors has SHA-256 [0-9a-f]{64}, the "
                                             "checkpoint recorded [0-9a-f]{64}"):
        ckpt.load(newest)
    with caplog.at_level(logging.WARNING):
        path, sd, st = ckpt.load_newest(tmp_path / "checkpoints")
    assert path == done[0] and st["step"] == 5
    assert "instead of the damaged" in caplog.text and newest.name in caplog.text
    # a truncated state file: the same fallback
    s = newest / ckpt.STATE
    w.write_bytes(orig)
    s.write_bytes(s.read_bytes()[:100])
    assert ckpt.load_newest(tmp_path / "checkpoints")[0] == done[0]


def test_resume_falls_back_past_a_truncated_newest_checkpoint(tmp_path):
    _trainer(tmp_path, max_steps=12, checkpoint_every=4).fit()  # keeps steps 8 and 12
    newest = ckpt.latest(tmp_path / "checkpoints")
    (newest / ckpt.WEIGHTS).write_bytes((newest / ckpt.WEIGHTS).read_bytes()[:50])
    resumed = _trainer(tmp_path, max_steps=12, checkpoint_every=4)
    assert resumed.restore() and resumed.step == 8


def test_resume_from_a_missing_path_is_one_clear_error(tmp_path):
    t = _trainer(tmp_path, resume=str(tmp_path / "nope"))
    with pytest.raises(Exception, match="trainer.resume: no complete checkpoint at .*nope"):
        t.fit()


def _val_rows(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(ln)["split"] == "val"]


def test_torn_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    t = _trainer(tmp_path, max_steps=10, checkpoint_every=5)
    t.evaluate = lambda m: {"v": 1.0}
    t.fit()
    m = tmp_path / "metrics.jsonl"
    rows = m.read_text().splitlines()
    m.write_text("\n".join(rows) + '\n{"step": 11, "split": "tr')  # killed mid-write
    for p in ckpt.complete(tmp_path / "checkpoints")[1:]:
        shutil.rmtree(p)  # resume from step 5
    t2 = _trainer(tmp_path, max_steps=10, checkpoint_every=5)
    t2.evaluate = lambda m: {"v": 1.0}
    with caplog.at_level(logging.WARNING):
        t2.fit()
    assert "torn" in caplog.text
    steps = [json.loads(ln)["step"] for ln in m.read_text().splitlines()
             if json.loads(ln)["split"] == "train"]
    assert steps == list(range(1, 11))


def test_rerun_of_a_finished_run_logs_no_second_final_validation(tmp_path):
    t = _trainer(tmp_path, max_steps=10)
    t.evaluate = lambda m: {"v": 1.0}
    t.fit()
    before = (tmp_path / "metrics.jsonl").read_text()
    final = ckpt.latest(tmp_path / "checkpoints")
    mtime = (final / ckpt.MARKER).stat().st_mtime_ns
    t2 = _trainer(tmp_path, max_steps=10)
    t2.evaluate = lambda m: {"v": 1.0}
    out = t2.fit()
    assert out["step"] == 10 and out["checkpoint"] == str(final)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert [r["step"] for r in _val_rows(tmp_path)] == [0, 10]
    assert (final / ckpt.MARKER).stat().st_mtime_ns == mtime  # not rewritten


def test_second_process_on_a_run_directory_is_refused(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from omnimask.runlock import RunLock; "
         f"RunLock({str(tmp_path)!r}, 'omnimask pretrain --out x'); print('locked', flush=True);"
         " time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryBusy, match=f"in use by pid {holder.pid} .*omnimask "
                                                    "pretrain --out x"):
            RunLock(tmp_path)
        t = _trainer(tmp_path)
        with pytest.raises(RunDirectoryBusy):
            t.fit()
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 10  # the kernel drops a dead holder's lock
    while True:
        try:
            RunLock(tmp_path).release()
            break
        except RunDirectoryBusy:
            assert time.time() < deadline
            time.sleep(0.1)


def test_one_process_may_take_its_own_lock_twice(tmp_path):
    a = RunLock(tmp_path)
    b = RunLock(tmp_path)
    b.release()
    code = ("from omnimask.runlock import RunLock, RunDirectoryBusy\n"
            f"try:\n    RunLock({str(tmp_path)!r})\nexcept RunDirectoryBusy:\n    print('busy')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "busy"  # still held by a
    a.release()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == ""


def test_shard_edited_in_place_changes_the_corpus_fingerprint(tmp_path):
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"a" * 4096)
    st = shard.stat()
    before = _fingerprint([str(shard)], {})
    shard.write_bytes(b"a" * 2048 + b"b" + b"a" * 2047)  # same size, same manifest
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    assert _fingerprint([str(shard)], {}) != before
