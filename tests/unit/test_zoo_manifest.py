"""Zoo manifests: what a valid entry is, and one clear error naming the key otherwise."""

from __future__ import annotations

import copy
import json

import pytest

from omnimask.zoo.manifest import ManifestError, dump_manifest, parse_manifest, safe_relpath

SHA = "0" * 64
GOOD = {"format": "omnimask-zoo", "format_version": 1, "models": [
    {"name": "org/model-1", "tasks": ["vqa"], "description": "d",
     "files": [{"path": "config.json", "url": "org/model-1/config.json", "sha256": SHA,
                "size": 3},
               {"path": "model.safetensors", "url": "https://h/x.safetensors", "sha256": SHA,
                "size": 5},
               {"path": "tokenizers/text/tokenizer.json", "url": "hf://org/repo/t.json",
                "sha256": SHA, "size": 1}],
     "metrics": [{"task": "vqa", "split": "test", "n": 4, "metrics": {"accuracy": 0.5}}]}]}


def _parse(doc) -> list:
    return parse_manifest(json.dumps(doc), "m.json", "/x/m.json")


def test_a_valid_manifest_round_trips():
    [e] = _parse(GOOD)
    assert e.name == "org/model-1" and e.size == 9 and e.tasks == ("vqa",)
    assert e.headline() == "vqa accuracy 0.500 (test)"
    [back] = parse_manifest(dump_manifest([e]), "again")
    assert back.files == e.files and back.metrics == e.metrics


def _bad(path: tuple, value) -> dict:
    doc = copy.deepcopy(GOOD)
    node = doc
    for k in path[:-1]:
        node = node[k]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


@pytest.mark.parametrize(("path", "value", "message"), [
    (("format",), "other", "not an omnimask zoo manifest"),
    (("format_version",), 9, "newer omnimask"),
    (("models", 0, "name"), "NoSlash", "not 'org/model'"),
    (("models", 0, "name"), "a/b/c", "not 'org/model'"),
    (("models", 0, "files", 0, "path"), "../escape", "not a safe relative path"),
    (("models", 0, "files", 0, "path"), "/etc/passwd", "not a safe relative path"),
    (("models", 0, "files", 0, "path"), "a\\b", "not a safe relative path"),
    (("models", 0, "files", 0, "path"), "C:/x", "not a safe relative path"),
    (("models", 0, "files", 0, "url"), "ftp://h/x", "scheme not supported"),
    (("models", 0, "files", 0, "url"), "../../x", "not a safe relative path"),
    (("models", 0, "files", 0, "sha256"), "abc", "64 lowercase hex"),
    (("models", 0, "files", 0, "size"), -1, "size must be >= 0"),
    (("models", 0, "files", 0, "size"), True, "'size' must be a int"),
    (("models", 0, "files", 0, "sha256"), KeyError, "'sha256' is missing"),
    (("models", 0, "files", 1), {"path": "x.bin", "url": "x", "sha256": SHA, "size": 1},
     "must include config.json and model.safetensors"),
    (("models", 0, "files", 2, "path"), "config.json", "listed twice"),
    (("models", 0, "metrics"), [1], "list of eval JSON"),
])
def test_a_bad_manifest_names_the_key(path, value, message):
    with pytest.raises(ManifestError, match=message) as e:
        _parse(_bad(path, value))
    assert str(e.value).startswith("m.json")


def test_names_twice_and_not_json_are_refused():
    doc = copy.deepcopy(GOOD)
    doc["models"].append(copy.deepcopy(doc["models"][0]))
    with pytest.raises(ManifestError, match="org/model-1 listed twice"):
        _parse(doc)
    with pytest.raises(ManifestError, match="m.json is not JSON"):
        parse_manifest("{", "m.json")


@pytest.mark.parametrize("p", ["a", "a/b.json", "tokenizers/text/vocab.json"])
def test_safe_relative_paths_pass(p):
    assert safe_relpath(p, "x") == p


@pytest.mark.parametrize("p", ["", ".", "a/./b", ".hidden", "a//b", "a/\x00"])
def test_unsafe_relative_paths_fail(p):
    with pytest.raises(ManifestError):
        safe_relpath(p, "x")


def test_the_shipped_manifest_matches_its_files():
    """Every file the repository's zoo/manifest.json lists is there with its size and hash,
    and every file under zoo/ is listed (nothing stale ships in the wheel)."""
    from omnimask.safeio import sha256_file
    from omnimask.zoo import builtin_manifest
    from omnimask.zoo.manifest import read_manifest_file

    root = builtin_manifest().parent
    entries = read_manifest_file(builtin_manifest())
    assert entries, "zoo/manifest.json lists no model"
    listed = set()
    for e in entries:
        assert e.recipe.get("command") and e.license and e.description, e.name
        for f in e.files:
            p = root / f.url
            assert p.stat().st_size == f.size and sha256_file(p) == f.sha256, f.url
            listed.add(f.url)
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
               and p.name not in ("manifest.json", "__init__.py") and "__pycache__" not in p.parts}
    assert on_disk == listed
