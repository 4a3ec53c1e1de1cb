"""The benchmarks' own conventions: their export records, their prediction files and their metrics.

One module per benchmark whose public evaluation code refforge matches exactly:

==================  =================  ==================================================================
module              metric prefix      upstream scorer
==================  =================  ==================================================================
``finecops``        ``finecops.``      FineCops-Ref ``evaluation/eval_metric.py``
``refbench_pro``    ``refbench_pro.``  RefBench-PRO ``get_prediction_Acc.py``
``groundingme``     ``groundingme.``   GroundingME ``evaluate.py`` (and its lmms-eval task)
==================  =================  ==================================================================

(``univg`` holds the trainer formats, r1 for UniVG-R1 / open-r1 GRPO and sft for LLaMA-Factory: it has
no metrics.)

Each scoring module provides ``NAME``, ``TITLE``, ``UPSTREAM`` (repository, commit, files checked),
``write_export``, ``read_export``, ``is_native(line)``, ``native_predictions(samples, preds)``,
``from_native(lines, samples)`` and ``score(samples, lines)``; see ``finecops`` for the contract.

:func:`detect_format` decides which kind of predictions file a list of lines is: refforge's own
(``sample_id`` with ``bbox`` or ``answer``), or one benchmark's native file. A file whose lines fit
several kinds, or none, is refused with one line saying why; it is never guessed.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

__all__ = ["REFFORGE", "SCORERS", "FormatError", "detect_format", "scorer", "scorers"]

SCORERS: tuple[str, ...] = ("finecops", "refbench_pro", "groundingme")
"""The benchmarks whose metrics refforge eval computes as their own code does (module names)."""

REFFORGE = "refforge"
"""The name of refforge's own predictions-file format."""

ALIASES: dict[str, str] = {"refbench-pro": "refbench_pro", "finecops-ref": "finecops", "refforge": REFFORGE}


class FormatError(ValueError):
    """A predictions file whose kind cannot be told, or is not the kind asked for."""


def scorer(name: str) -> ModuleType:
    """The module of one benchmark (``"finecops"``, ``"refbench_pro"`` or ``"groundingme"``; ``-`` spellings too)."""
    key = ALIASES.get(name, name)
    if key not in SCORERS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(SCORERS)}")
    return importlib.import_module(f"{__name__}.{key}")


def scorers() -> list[ModuleType]:
    """Every scoring module, in :data:`SCORERS` order."""
    return [scorer(n) for n in SCORERS]


def detect_format(lines: Sequence[Mapping[str, Any]], forced: str | None = None, where: str = "predictions") -> str:
    """``"refforge"`` or a benchmark name for a predictions file's lines.

    A line that a benchmark recognises as its own (``is_native``) belongs to that benchmark even when it
    also carries a ``sample_id`` (RefBench-PRO's ``bbox`` is the ground truth and ``pred_bbox`` the
    prediction: read as refforge's, such a file would score every sample perfect). Every line must be
    of the same one kind; ``forced`` (``--predictions-format``) names the kind and then every line must
    fit it.

    >>> detect_format([{"sample_id": "a", "bbox": None}])
    'refforge'
    """
    if not lines:
        raise FormatError(f"{where} holds no predictions")
    modules = scorers()
    kinds: list[set[str]] = []
    for line in lines:
        native = {m.NAME for m in modules if m.is_native(line)}
        # a line with a string sample_id that no benchmark claims is refforge's (its reader then says
        # what the line lacks)
        kinds.append(native or ({REFFORGE} if isinstance(line.get("sample_id"), str) else set()))
    if forced is not None and forced != "auto":
        want = ALIASES.get(forced, forced)
        if want != REFFORGE and want not in SCORERS:
            raise FormatError(f"unknown predictions format {forced!r}; expected auto, refforge or "
                              f"{', '.join(SCORERS)}")
        for n, k in enumerate(kinds, start=1):
            fits = want in k
            if not fits:
                raise FormatError(f"{where}: line {n} is not a {want} prediction")
        return want
    for n, k in enumerate(kinds, start=1):
        if not k:
            raise FormatError(f"{where}: line {n} is no known predictions format (refforge: sample_id with bbox "
                              f"or answer; or a native file of {', '.join(SCORERS)})")
        if len(k) > 1:
            raise FormatError(f"{where}: line {n} fits several formats ({', '.join(sorted(k))}); name one with "
                              "--predictions-format")
    found = set().union(*kinds)
    if len(found) > 1:
        raise FormatError(f"{where} mixes predictions formats ({', '.join(sorted(found))}); one file holds one kind")
    return found.pop()
