"""``omnimask zoo list|info|download|publish``: the named models (``omnimask.zoo``)."""

from __future__ import annotations

import argparse
import json

from .common import QUIET, _check_out_dir


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def cmd_list(a: argparse.Namespace) -> int:
    from ..zoo import entries, manifest_sources
    from ..zoo.fetch import cached, home

    known = entries()
    if a.json:
        print(json.dumps([e.to_dict() for e in known.values()], indent=1))
        return 0
    if not known:
        print("no zoo models: no manifest lists any (OMNIMASK_ZOO=PATH|URL adds one)")
        return 0
    rows = [(e.name, ",".join(e.tasks), _mb(e.size), "yes" if cached(e, home()) else "",
             e.headline() or "-") for e in known.values()]
    head = ("name", "tasks", "size", "cached", "headline metrics")
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    for r in [head, *rows]:
        print("  ".join(r[i].ljust(w[i]) for i in range(4)) + "  " + r[4])
    print(f"(manifests: {', '.join(manifest_sources())}; cache: {home()})")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from ..zoo import entry
    from ..zoo.fetch import cached, entry_dir, home, resolve_url

    e = entry(a.name)
    print(f"{e.name}: {e.description}")
    print(f"  tasks {', '.join(e.tasks)}; architecture {e.architecture}; licence "
          f"{e.license or '-'}; {_mb(e.size)} in {len(e.files)} files")
    print(f"  cache {entry_dir(e, home())} ({'complete' if cached(e, home()) else 'missing'})")
    for k, v in e.recipe.items():
        print(f"  recipe.{k}: {v}")
    for ev in e.metrics:
        flat = {k: v for k, v in ev.get("metrics", {}).items() if isinstance(v, (int, float))}
        print(f"  {ev.get('task')} on {ev.get('split', '?')} (n={ev.get('n', '?')}): "
              + ", ".join(f"{k} {v:.3f}" for k, v in flat.items()))
    if a.files:
        for f in e.files:
            print(f"  {f.path:<44} {f.size:>10}  {f.sha256[:16]}  {resolve_url(f, e)}")
    return 0


def cmd_download(a: argparse.Namespace) -> int:
    from ..zoo import entry
    from ..zoo.fetch import fetch_entry

    d = fetch_entry(entry(a.name), progress=None if not a.quiet else False, force=a.force)
    print(d)
    return 0


def cmd_publish(a: argparse.Namespace) -> int:
    from ..zoo.publish import MANIFEST, publish

    _check_out_dir(a.to, "--to")
    recipe = {k: v for k, v in (("command", a.recipe_command), ("config", a.recipe_config))
              if v}
    e = publish(a.source, a.name, a.to, evals=a.eval or (), description=a.description,
                license=a.license, recipe=recipe, dtype=a.dtype, base_url=a.base_url)
    print(f"published {e.name} ({_mb(e.size)}, {len(e.files)} files) into {a.to}/{MANIFEST}")
    print(f"try it: OMNIMASK_ZOO={a.to}/{MANIFEST} omnimask zoo info {e.name}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    z = sub.add_parser("zoo", help="named pretrained models: list, info, download, publish",
                       description="Named models from the shipped manifest and OMNIMASK_ZOO "
                       "(paths or URLs, comma-separated), downloaded into $OMNIMASK_HOME "
                       "(default ~/.cache/omnimask) and verified by SHA-256. "
                       "OMNIMASK_OFFLINE=1 never opens a socket.")
    zs = z.add_subparsers(dest="zoo_command", required=True, metavar="ACTION")
    ls = zs.add_parser("list", help="the known models as a table")
    ls.add_argument("--json", action="store_true", help="the entries as JSON")
    ls.set_defaults(fn=cmd_list)
    info = zs.add_parser("info", help="one model: tasks, metrics, recipe, files")
    info.add_argument("name")
    info.add_argument("--files", action="store_true", help="list its files with hashes")
    info.set_defaults(fn=cmd_info)
    dl = zs.add_parser("download", parents=[QUIET], help="fetch a model into the cache")
    dl.add_argument("name")
    dl.add_argument("--force", action="store_true", help="download again even if cached")
    dl.set_defaults(fn=cmd_download)
    pb = zs.add_parser("publish", help="a model or run directory as a zoo entry",
                       description="Write SOURCE (a model directory, a run directory with "
                       "model/, or a pretraining run) into TO/<org>/<model>/ and its entry "
                       "into TO/manifest.json (sha256 and size of every file), ready to serve "
                       "over HTTP or upload.")
    pb.add_argument("source", help="RUN_DIR or MODEL_DIR")
    pb.add_argument("--name", required=True, help="org/model, e.g. omnimask/shapes-tiny-vqa")
    pb.add_argument("--to", required=True, help="zoo folder (its manifest.json is updated)")
    pb.add_argument("--eval", nargs="+", metavar="JSON",
                    help="eval JSONs (omnimask eval --out) to list as the model's metrics")
    pb.add_argument("--description", default="")
    pb.add_argument("--license", default="")
    pb.add_argument("--recipe-command", help="the command that trained it")
    pb.add_argument("--recipe-config", help="the recipe config it trained from")
    pb.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="weights dtype of the published model.safetensors")
    pb.add_argument("--base-url", help="absolute URL prefix for the files (default: "
                                       "relative to the manifest)")
    pb.set_defaults(fn=cmd_publish)
