"""Text tokenizer directories load with ``AutoTokenizer`` on the oldest transformers that
pyproject allows (4.40, tokenizers 0.19), in a small venv of their own: CI only
(OMNIMASK_OLD_TRANSFORMERS_TEST=1; it installs from the package index)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from omnimask.modalities.text.tokenizer import TextTokenizer, TextTokenizerConfig

pytestmark = pytest.mark.skipif(os.environ.get("OMNIMASK_OLD_TRANSFORMERS_TEST") != "1",
                                reason="set OMNIMASK_OLD_TRANSFORMERS_TEST=1 (CI does) to "
                                       "install transformers 4.40 into a venv")
OLDEST = "transformers==4.40.2"  # pyproject: transformers>=4.40, tokenizers>=0.19

SCRIPT = """
import json, sys
from transformers import AutoTokenizer, __version__
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print(json.dumps({"version": __version__, "class": type(tok).__name__,
                  "plain": tok("a red square", add_special_tokens=False)["input_ids"],
                  "single": tok("a red square")["input_ids"],
                  "pair": tok("a red square", "two circles")["token_type_ids"],
                  "mask": tok.mask_token_id, "extra": tok.additional_special_tokens[:2]}))
"""


def test_oldest_allowed_transformers_loads_a_saved_tokenizer(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", OLDEST],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-2000:]
    texts = ["a red square left of a blue circle", "two small green triangles"] * 40
    ours = TextTokenizer.train(texts, TextTokenizerConfig(vocab_size=300, num_sentinels=4))
    ours.save(tmp_path / "tok")
    run = subprocess.run([str(venv / "bin" / "python"), "-c", SCRIPT, str(tmp_path / "tok")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    ids, r = ours.encode("a red square"), ours.roles
    assert got["version"] == OLDEST.split("==")[1]
    assert got["class"] == "PreTrainedTokenizerFast"
    assert got["plain"] == ids and got["single"] == [r["cls"], *ids, r["sep"]]
    assert got["pair"] == [0] * (len(ids) + 2) + [1] * (len(ours.encode("two circles")) + 1)
    assert got["mask"] == r["mask"] and got["extra"] == ["<image>", "</image>"]
