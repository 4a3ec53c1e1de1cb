"""Load a refforge r1 export with UniVG-R1's own GRPO data loader and score it with its own rewards.

    python benchmarks/upstream_univg.py --upstream /path/to/UniVG-R1 [--export EXPORT] [--split test]
                                        [--dialect grid1000]

``--upstream``: a checkout of github.com/AMAP-ML/UniVG-R1 (checked at commit 44868ea3). ``--export``: a
refforge export (default: the demo config is built and exported into a temporary folder). The r1 files
are written from the export's canonical records with ``refforge.stages.benchmarks.univg.write_r1`` in
``--dialect`` (``grid1000`` / ``qwen2vl``: answers on the 0-1000 grid, Qwen2-VL's frame; the others:
pixels).

How the upstream code is loaded: ``src/open-r1-multimodal/src/open_r1/grpo_univg.py`` is imported from the
checkout, unedited, with the checkout's ``open_r1`` folder first on ``sys.path`` as when it is run (so
``vlm_modules`` is the checkout's own). Its heavy imports (torch, torchvision, transformers, trl,
math_verify, yaml, qwen_vl_utils and its ``trainer`` package, which pulls in DeepSpeed and friends) are
replaced in ``sys.modules`` by empty stub modules whose attributes are empty classes: nothing of them runs
in the loader or the rewards (the flash-attention patch assigns to a stub class). Then, from the
current directory = the export root (the trainer opens ``images`` paths as given):

* ``LazySupervisedDataset(r1/<split>.json, ..., question_template=Qwen2VLModule.get_question_template("rec"),
  single_img_with_cot=False)`` (as ``run_grpo_univg.sh`` runs it) yields every example; its images open
  with PIL; its prompt has one image entry per image and the question text;
* ``Qwen2VLModule.iou_reward`` and ``format_reward_rec`` (the ``accuracy`` and ``format`` rewards) get, with
  the keyword arguments the trainer passes (``image_path``, ``problem``, ``prompt``, ``single_img_with_cot``),
  an oracle completion (``<think>..</think><answer>(x1,y1),(x2,y2)</answer>`` from the answer): both must
  be 1.0; and wrong completions (a box apart from the target, ``<answer>none</answer>``, the answer in
  refforge's old ``[x1, y1, x2, y2]`` form): accuracy must be 0.0.

Exit 0: every example loads and every reward is as expected; 1: something is not; 2: the checkout is absent.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import tempfile
import types
from collections import Counter
from pathlib import Path

from _upstream import demo_export  # noqa: E402  (benchmarks/ is the script's folder)

STUBBED = ("torch", "torchvision", "transformers", "trl", "math_verify", "yaml", "qwen_vl_utils", "trainer",
           "deepspeed", "accelerate", "peft", "flash_attn", "wandb")


class _StubModule(types.ModuleType):
    """A module whose every attribute is an empty class (created on first access)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (), {})
        setattr(self, name, cls)
        return cls


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = _StubModule(spec.name)
        mod.__path__ = []
        return mod

    def exec_module(self, module):
        return None


def _build_demo(tmp: Path) -> Path:
    return demo_export(tmp, ["parquet", "jsonl", "r1", "sft"])


def load_upstream(checkout: Path) -> types.ModuleType:
    """``grpo_univg`` imported from the checkout with the heavy imports stubbed (see the module doc)."""
    open_r1 = checkout / "src" / "open-r1-multimodal" / "src" / "open_r1"
    for name in [n for n in sys.modules if n.split(".")[0] in STUBBED]:
        del sys.modules[name]  # a real torch etc. must not leak in: the loader and rewards need none
    sys.meta_path.insert(0, _StubFinder())
    sys.path.insert(0, str(open_r1))
    spec = importlib.util.spec_from_file_location("grpo_univg", open_r1 / "grpo_univg.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _apart(ans: list[int], limit_w: int, limit_h: int) -> list[int] | None:
    """An integer box that does not overlap ``ans`` (None when the target fills the frame)."""
    x1, y1, x2, y2 = ans
    if x1 >= 3:
        return [0, y1, x1, y2]
    if limit_w - x2 >= 3:
        return [x2, y1, limit_w, y2]
    if y1 >= 3:
        return [x1, 0, x2, y1]
    if limit_h - y2 >= 3:
        return [x1, y2, x2, limit_h]
    return None


def _completion(box: list[int]) -> list[dict[str, str]]:
    return [{"role": "assistant",
             "content": f"<think>The target is there.</think><answer>({box[0]},{box[1]}),({box[2]},{box[3]})</answer>"}]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", type=Path, required=True, help="checkout of AMAP-ML/UniVG-R1")
    ap.add_argument("--export", type=Path, help="a refforge export (default: build and export the demo)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--dialect", default="grid1000")
    args = ap.parse_args(argv)
    if not (args.upstream / "src" / "open-r1-multimodal" / "src" / "open_r1" / "grpo_univg.py").is_file():
        print(f"no UniVG-R1 checkout at {args.upstream} (grpo_univg.py missing): skipped")
        return 2
    os.environ.pop("DEBUG_MODE", None)  # the rewards would append to LOG_PATH

    from PIL import Image

    from refforge.stages.benchmarks import univg
    from refforge.stages.export_records import read_canonical

    with tempfile.TemporaryDirectory(prefix="refforge-univg-") as t:
        tmp = Path(t)
        export = (args.export or _build_demo(tmp)).resolve()
        samples = read_canonical(export, args.split)
        out = tmp / "r1"
        manifest = univg.write_r1(out, {args.split: samples}, dialect=args.dialect)
        grid = manifest["coords"] == "grid1000"
        up = load_upstream(args.upstream.resolve())
        Module = up.Qwen2VLModule
        template = Module.get_question_template(task_type="rec")
        cwd = os.getcwd()
        os.chdir(export)
        try:
            ds = up.LazySupervisedDataset(str(out / f"{args.split}.json"), None, question_template=template,
                                          single_img_with_cot=False)
            records = json.loads((out / f"{args.split}.json").read_text(encoding="utf-8"))
            problems: list[str] = []
            tally: Counter[str] = Counter()
            for i in range(len(ds)):
                item = ds[i]
                rec = records[i]
                for p in item["image_path"]:
                    with Image.open(p) as im:
                        im.load()
                content = item["prompt"][0]["content"]
                n_img = sum(1 for c in content if c.get("type") == "image")
                text = content[-1]["text"]
                if n_img != len(rec["images"]) or rec["expression"] not in text or "<image>" in text \
                        or not text.endswith(template.split("{Question}")[1]):
                    problems.append(f"{rec['id']}: prompt {content!r}")
                ans = [int(v) for v in item["solution"]]
                kw = {"image_path": [item["image_path"]], "problem": [item["problem"]], "prompt": [item["prompt"]],
                      "single_img_with_cot": False}
                acc = Module.iou_reward([_completion(ans)], [item["solution"]], **kw)[0]
                fmt = Module.format_reward_rec([_completion(ans)], **kw)[0]
                tally["oracle accuracy 1.0"] += acc == 1.0
                tally["oracle format 1.0"] += fmt == 1.0
                if acc != 1.0 or fmt != 1.0:
                    problems.append(f"{rec['id']}: oracle answer {ans} earns accuracy {acc}, format {fmt}")
                limit_w, limit_h = (1000, 1000) if grid else (rec["width"], rec["height"])
                wrong = [("none", [{"role": "assistant", "content": "<think>x</think><answer>none</answer>"}]),
                         ("old form", [{"role": "assistant",
                                        "content": f"<think>x</think><answer>{json.dumps(ans)}</answer>"}])]
                apart = _apart(ans, limit_w, limit_h)
                if apart is not None:
                    wrong.append(("box apart", _completion(apart)))
                for name, comp in wrong:
                    got = Module.iou_reward([comp], [item["solution"]], **kw)[0]
                    tally[f"wrong ({name}) accuracy 0.0"] += got == 0.0
                    if got != 0.0:
                        problems.append(f"{rec['id']}: wrong answer ({name}) earns accuracy {got}")
        finally:
            os.chdir(cwd)
        print(f"UniVG-R1 grpo_univg.py loader and rewards · {export} · {args.split} · dialect {args.dialect} "
              f"({manifest['coords']})")
        print(f"examples loaded: {len(ds)} of {len(samples)} samples; left out: {manifest['left_out'][args.split]}")
        for k, v in tally.items():
            print(f"  {k:<32} {v:>6} / {len(ds) if 'apart' not in k else '-'}")
        for p in problems[:20]:
            print("PROBLEM", p)
        print("all examples load and every reward is as expected" if not problems
              else f"{len(problems)} problem(s)")
        return 1 if problems or len(ds) == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
