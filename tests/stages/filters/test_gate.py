"""What an export keeps by the filters' verdicts (stages/filters.gate): failed scores leave a sample out, one
candidate per edit survives, a verifying pass clears a model edit's needs_review."""

from __future__ import annotations

import json

from refforge.stages.filters import gate


def _s(sid, image, needs_review=False, reason=None):
    path = json.dumps({"category": "cup", **({"review_reason": reason} if reason else {})})
    return {"sample_id": sid, "image_id": image, "needs_review": needs_review, "path": path}


def _score(subject, name, passed, value=0.5):
    return {"subject_id": subject, "filter": name, "value": value, "passed": passed}


EDITS = {"c0": {"type": "remove", "group": "g", "candidate": 0}, "c1": {"type": "remove", "group": "g", "candidate": 1},
         "c2": {"type": "remove", "group": "g", "candidate": 2}, "solo": {"type": "remove", "group": "h", "candidate": 0},
         "flip": {"type": "flip"}}


def test_without_best_of_n_only_the_first_candidate_is_kept():
    samples = [_s("a", "c0"), _s("b", "c1"), _s("c", "c2"), _s("d", "solo"), _s("e", "flip"), _s("f", "original")]
    kept, dropped = gate(samples, [], EDITS)
    assert [s["sample_id"] for s in kept] == ["a", "d", "e", "f"]
    assert dropped == {"another candidate of its edit (no best-of-N filter ran)": 2}


def test_best_of_n_choice_and_failed_filters():
    samples = [_s("a", "c0"), _s("b", "c1"), _s("c", "c2"), _s("d", "solo"), _s("e", "flip")]
    scores = [_score("c0", "dinov2", False), _score("c1", "dinov2", True), _score("c2", "dinov2", False),
              _score("solo", "dire", False), _score("e", "clip_margin", False), _score("c1", "seam", True)]
    kept, dropped = gate(samples, scores, EDITS)
    assert [s["sample_id"] for s in kept] == ["b"]
    assert dropped == {"failed filter dinov2": 2, "failed filter dire": 1, "failed filter clip_margin": 1}


def test_a_verifying_pass_clears_model_edits_only():
    samples = [_s("a", "c0", True, "model_edit"), _s("b", "solo", True, "model_edit"),
               _s("c", "flip", True, "flip_geometry_disagrees")]
    scores = [_score("a", "clip_margin", True), _score("c", "clip_margin", True), _score("b", "seam", True)]
    kept, _ = gate(samples, scores, EDITS)
    assert {s["sample_id"]: s["needs_review"] for s in kept} == {"a": False, "b": True, "c": True}
    assert samples[0]["needs_review"] is True  # the input rows are not changed


def test_a_filter_that_fails_everything_is_a_warning():
    from refforge.stages.filters import STAGE

    out = STAGE.summary([{"scores": {"dire/failed": 3, "seam/passed": 2}}, {"scores": {"dire/failed": 1, "seam/failed": 1}}])
    assert out["scores"] == {"dire": {"passed": 0, "failed": 4}, "seam": {"passed": 2, "failed": 1}}
    assert len(out["warnings"]) == 1 and out["warnings"][0].startswith("filters: dire failed all 4")
    assert "warnings" not in STAGE.summary([{"scores": {"seam/passed": 1}}])
