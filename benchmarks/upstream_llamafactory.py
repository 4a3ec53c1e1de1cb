"""Read a refforge sft export with LLaMA-Factory's own dataset code and count the broken examples.

    python benchmarks/upstream_llamafactory.py --upstream /path/to/LLaMA-Factory [--export EXPORT]
                                               [--split test] [--dialect qwen2vl]

``--upstream``: a checkout of github.com/hiyouga/LLaMA-Factory (checked at commit ff6d4d12). ``--export``: a
refforge export (default: the demo config is built and exported into a temporary folder). The sft files are
written from the export's canonical records with ``refforge.stages.benchmarks.univg.write_sft`` in
``--dialect`` (every dialect when ``--dialect all``).

What runs unedited from the checkout: ``src/llamafactory/data/parser.py`` (``get_dataset_list`` reads the
export's ``dataset_info.json``), ``data_utils.py`` and ``converter.py`` (``align_dataset`` with the sharegpt
converter, over a ``datasets.load_dataset("json", ...)`` of the file, as ``loader._load_single_dataset``
loads a local file), with ``media_dir`` = the export root; and ``MMPluginMixin._validate_messages`` of
``mm_plugin.py`` (the ``<image>``-count rule), taken out of the file with ``ast`` because that module
imports the model stack. Stubbed (the package ``__init__`` files pull in torch / transformers / peft):
``llamafactory``, ``llamafactory.extras`` and ``llamafactory.data`` as bare packages pointing at the
checkout, ``extras.logging`` (a logger that records the warnings), ``extras.constants`` (only
``DATA_CONFIG`` and the media placeholders, read from the real file with ``ast``) and ``extras.misc``
(``use_modelscope`` / ``use_openmind`` = False).

An example is broken when the converter skips it (empty prompt and response), when the supervised
processor would drop it (``len(_prompt) % 2 != 1`` or ``len(_response) != 1``), when
``_validate_messages`` raises, or when an image path does not resolve to a file under ``media_dir``.
Needs ``datasets`` (``pip install 'refforge[hf]'``). Exit 0: no broken example; 1: some; 2: the checkout is
absent.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

from _upstream import demo_export  # noqa: E402  (benchmarks/ is the script's folder)


def _build_demo(tmp: Path) -> Path:
    return demo_export(tmp, ["parquet", "jsonl", "sft"])


class _Logger:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def _warn(self, msg: Any, *a: Any, **k: Any) -> None:
        self.warnings.append(str(msg))

    warning = warning_rank0 = warning_rank0_once = warning_once = _warn

    def info(self, *a: Any, **k: Any) -> None:
        return None

    info_rank0 = debug = info


LOGGER = _Logger()


def _constants(src: Path) -> types.ModuleType:
    """``DATA_CONFIG`` and the placeholders of ``extras/constants.py``, evaluated from the file's own
    assignments (``os.getenv`` defaults included)."""
    mod = types.ModuleType("llamafactory.extras.constants")
    tree = ast.parse(src.read_text(encoding="utf-8"))
    wanted = {"DATA_CONFIG", "IMAGE_PLACEHOLDER", "VIDEO_PLACEHOLDER", "AUDIO_PLACEHOLDER", "FILEEXT2TYPE"}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in wanted:
            value = eval(compile(ast.Expression(node.value), str(src), "eval"), {"os": os})  # noqa: S307
            setattr(mod, node.targets[0].id, value)
    return mod


def _validate_messages(src: Path, consts: types.ModuleType):
    """``MMPluginMixin._validate_messages`` (inherited by every plugin) from ``mm_plugin.py``, unedited, as a plain function."""
    tree = ast.parse(src.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "MMPluginMixin":
            for f in node.body:
                if isinstance(f, ast.FunctionDef) and f.name == "_validate_messages":
                    f.decorator_list = []
                    g: dict[str, Any] = {"IMAGE_PLACEHOLDER": consts.IMAGE_PLACEHOLDER,
                                         "VIDEO_PLACEHOLDER": consts.VIDEO_PLACEHOLDER,
                                         "AUDIO_PLACEHOLDER": consts.AUDIO_PLACEHOLDER}
                    code = compile(ast.Module(body=[f], type_ignores=[]), str(src), "exec")
                    exec(code, g)  # noqa: S102
                    return g["_validate_messages"]
    raise RuntimeError(f"MMPluginMixin._validate_messages not found in {src}")


def load_upstream(checkout: Path) -> dict[str, Any]:
    pkg = checkout / "src" / "llamafactory"
    for name, path in (("llamafactory", pkg), ("llamafactory.extras", pkg / "extras"),
                       ("llamafactory.data", pkg / "data")):
        m = types.ModuleType(name)
        m.__path__ = [str(path)]
        sys.modules[name] = m
    consts = _constants(pkg / "extras" / "constants.py")
    sys.modules["llamafactory.extras.constants"] = consts
    log = types.ModuleType("llamafactory.extras.logging")
    log.get_logger = lambda name=None: LOGGER  # type: ignore[attr-defined]
    sys.modules["llamafactory.extras.logging"] = log
    sys.modules["llamafactory.extras"].logging = log  # type: ignore[attr-defined]
    misc = types.ModuleType("llamafactory.extras.misc")
    misc.use_modelscope = lambda: False  # type: ignore[attr-defined]
    misc.use_openmind = lambda: False  # type: ignore[attr-defined]
    sys.modules["llamafactory.extras.misc"] = misc
    import importlib

    return {"parser": importlib.import_module("llamafactory.data.parser"),
            "converter": importlib.import_module("llamafactory.data.converter"),
            "validate": _validate_messages(pkg / "data" / "mm_plugin.py", consts), "constants": consts}


def check(up: dict[str, Any], sft_dir: Path, export: Path, split: str) -> tuple[int, int, list[str]]:
    """(examples, broken, problems) of ``refforge_<split>`` in ``sft_dir``."""
    import datasets

    datasets.disable_progress_bars()

    attr = up["parser"].get_dataset_list([f"refforge_{split}"], str(sft_dir))[0]
    path = sft_dir / attr.dataset_name
    kind = up["constants"].FILEEXT2TYPE[path.suffix[1:]]
    ds = datasets.load_dataset(kind, data_files=[str(path)], split=attr.split, cache_dir=str(sft_dir / ".hf-cache"))
    data_args = types.SimpleNamespace(media_dir=str(export), streaming=False, preprocessing_num_workers=None,
                                      overwrite_cache=True)
    training_args = types.SimpleNamespace(local_process_index=0)
    LOGGER.warnings.clear()
    aligned = up["converter"].align_dataset(ds, attr, data_args, training_args)
    problems: list[str] = []
    for i, row in enumerate(aligned):
        prompt, response, images = row["_prompt"], row["_response"], row["_images"] or []
        why = []
        if len(prompt) % 2 != 1 or len(response) != 1:
            why.append(f"prompt of {len(prompt)} / response of {len(response)} messages")
        try:
            up["validate"](None, prompt + response, images, [], [])
        except ValueError as e:
            why.append(str(e)[:120])
        missing = [p for p in images if not os.path.isfile(p)]
        if missing:
            why.append(f"image not found: {missing[0]}")
        if why:
            problems.append(f"{ds[i]['id']}: {'; '.join(why)}")
    problems += [f"warning: {w[:160]}" for w in LOGGER.warnings]
    return len(aligned), sum(1 for p in problems if not p.startswith("warning:")), problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", type=Path, required=True, help="checkout of hiyouga/LLaMA-Factory")
    ap.add_argument("--export", type=Path, help="a refforge export (default: build and export the demo)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--dialect", default="all", help="an sft dialect, or all")
    args = ap.parse_args(argv)
    if not (args.upstream / "src" / "llamafactory" / "data" / "converter.py").is_file():
        print(f"no LLaMA-Factory checkout at {args.upstream} (src/llamafactory/data/converter.py missing): skipped")
        return 2
    logging.getLogger("datasets").setLevel(logging.ERROR)

    from refforge.stages.benchmarks import univg
    from refforge.stages.export_records import read_canonical

    dialects = univg.SFT_DIALECTS if args.dialect == "all" else (args.dialect,)
    up = load_upstream(args.upstream.resolve())
    with tempfile.TemporaryDirectory(prefix="refforge-llamafactory-") as t:
        tmp = Path(t)
        export = (args.export or _build_demo(tmp)).resolve()
        samples = read_canonical(export, args.split)
        bad = 0
        print(f"LLaMA-Factory sharegpt converter · {export} · {args.split} · {len(samples)} samples")
        print(f"{'dialect':<10} {'examples':>8} {'broken':>7} {'warnings':>8}")
        for dialect in dialects:
            sft_dir = tmp / f"sft-{dialect}"
            univg.write_sft(sft_dir, {args.split: samples}, dialect=dialect)
            n, broken, problems = check(up, sft_dir, export, args.split)
            warnings = sum(1 for p in problems if p.startswith("warning:"))
            print(f"{dialect:<10} {n:>8} {broken:>7} {warnings:>8}")
            for p in problems[:10]:
                print("   ", p)
            bad += broken + warnings + (n != len(samples))
        # control: the checker must see what LLaMA-Factory refuses (roles out of order, an extra <image>)
        ctl = tmp / "sft-control"
        univg.write_sft(ctl, {args.split: samples[:3]}, dialect="pixels")
        doc = json.loads((ctl / f"{args.split}.json").read_text(encoding="utf-8"))
        doc[0]["messages"].reverse()
        doc[1]["messages"][0]["content"] += " <image>"
        (ctl / f"{args.split}.json").write_text(json.dumps(doc), encoding="utf-8")
        _, ctl_broken, _ = check(up, ctl, export, args.split)
        print(f"control: {ctl_broken} of 2 deliberately broken examples found")
        bad += ctl_broken != 2
        print("0 broken examples" if not bad else "broken examples or warnings found")
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
