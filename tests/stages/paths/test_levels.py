"""The level mix a user sets ([paths] levels), positions left out of the minimal search, achieved versus asked."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refforge._strict import ConfigError
from refforge.config import load_config, parse_config
from refforge.flows.build import run_build
from refforge.flows.report import render_report
from refforge.stages import report
from refforge.stages.ingest.sources import convert_gqa
from refforge.stages.ingest.synthetic import generate_scene
from refforge.stages.paths import STAGE, PathsConfig, _level_extra, unit_paths
from refforge.stages.paths.levels import SHORT_POINTS, Group, level_summary, parse_levels, quotas, select
from refforge.stages.paths.rows import expressions_for_graph
from refforge.stages.paths.search import TargetSelection, referring_paths
from refforge.stages.scene.graph import GObject, GRelation, SceneGraph
from refforge.stages.scene.keys import stable_key
from refforge.stages.scene.query import Node, evaluate
from refforge.storage import Catalog
from tests.conftest import small_config

FIX = Path(__file__).resolve().parents[2] / "fixtures"
MIX = {1: 0.3, 2: 0.4, 3: 0.3}
ASKS = [MIX, {1: 0.2, 2: 0.5, 3: 0.3}, {1: 0.1, 2: 0.3, 3: 0.6}, {1: 0.5, 2: 0.5, 3: 0.0}, {1: 0.0, 2: 0.0, 3: 1.0}]
# everything a target (the GQA excerpts' boxes touch the border and include stuff classes)
OPEN = {"min_area_frac": 0.0, "max_area_frac": 1.0, "blocklist": [], "drop_border_cut": False}


def gqa_graphs(path: Path, tmp: Path) -> dict[str, SceneGraph]:
    """GQA scene graphs as the gqa source reads them (its converter, then one SceneGraph per record; relations
    to objects left out are ignored by the search)."""
    out_jsonl = tmp / f"{path.stem}.jsonl"
    convert_gqa(path, out_jsonl)
    graphs = {}
    for line in out_jsonl.read_text().splitlines():
        r = json.loads(line)
        objects = [GObject(o["id"], o["name"], tuple(o["box"]), tuple(o["attributes"])) for o in r["objects"]
                   if o["box"][0] < o["box"][2] and o["box"][1] < o["box"][3]]  # ingest drops empty boxes
        relations = [GRelation(x["subject"], x["predicate"], x["object"]) for x in r.get("relations", [])]
        graphs[r["id"]] = SceneGraph(r["width"], r["height"], objects, relations)
    return graphs


@pytest.fixture(scope="module")
def synthetic() -> dict[str, SceneGraph]:
    return {f"s{i}": generate_scene(i).graph for i in range(40)}


@pytest.fixture(scope="module")
def gqa_real(tmp_path_factory) -> dict[str, SceneGraph]:
    path = FIX / "real" / "gqa" / "train_sceneGraphs_excerpt.json"
    return gqa_graphs(path, tmp_path_factory.mktemp("gqa_real"))


@pytest.fixture(scope="module")
def gqa_fixture(tmp_path_factory) -> dict[str, SceneGraph]:
    return gqa_graphs(FIX / "gqa" / "scene_graphs.json", tmp_path_factory.mktemp("gqa"))


def level_counts(paths_per_image) -> Counter:
    return Counter(p.level for paths in paths_per_image for p in paths)


def pct(counts: Counter) -> dict[int, float]:
    total = sum(counts.values())
    return {lv: 100.0 * counts[lv] / total for lv in (1, 2, 3)}


def miss(achieved: dict[int, float], asked: dict[int, float]) -> float:
    """The largest gap in points between the achieved and the asked share of a level."""
    return max(abs(achieved[lv] - 100.0 * asked[lv]) for lv in (1, 2, 3))


# ------------------------------------------------------------------------------------------ config


def test_levels_are_validated_and_normalised():
    assert parse_config({"paths": {"levels": {"1": 3, "2": 4, "3": 3}}}).paths.levels == {1: 0.3, 2: 0.4, 3: 0.3}
    assert parse_config({"paths": {"levels": {"3": 1}}}).paths.levels == {1: 0.0, 2: 0.0, 3: 1.0}
    assert parse_levels({1: 0.25, 2: 0.25, 3: 0.5}) == {1: 0.25, 2: 0.25, 3: 0.5}
    cfg = parse_config({})
    assert cfg.paths.levels is None and cfg.paths.positions_in_minimal == "auto"


@pytest.mark.parametrize(("paths", "where", "says"), [
    ({"levels": {"4": 0.5, "1": 0.5}}, "paths.levels", "unknown level '4'; allowed: 1, 2, 3"),
    ({"levels": {"0": 1}}, "paths.levels", "unknown level '0'"),
    ({"levels": {"1": -0.1, "2": 1}}, "paths.levels", "share of level 1 must be a finite number >= 0"),
    ({"levels": {"1": "lots"}}, "paths.levels", "share of level 1 must be a number"),
    ({"levels": {"1": True}}, "paths.levels", "share of level 1 must be a number"),
    ({"levels": {"1": 0, "2": 0, "3": 0}}, "paths.levels", "positive sum"),
    ({"levels": {"1": float("nan")}}, "paths.levels", "finite"),
    ({"levels": 0.3}, "paths.levels", "must be a table like {1 = 0.3, 2 = 0.4, 3 = 0.3}"),
    ({"positions_in_minimal": "sometimes"}, "paths.positions_in_minimal", 'must be "auto", true or false'),
    ({"levels_min_kept": 0.5}, "paths", "levels_min_kept is set but levels is not"),
    ({"positions": False, "positions_in_minimal": True}, "paths", "positions_in_minimal = true needs positions"),
])
def test_config_errors_are_one_line(paths, where, says):
    with pytest.raises(ConfigError) as err:
        parse_config({"paths": paths})
    header, *problems = str(err.value).splitlines()
    assert header.startswith("invalid config")
    assert len(problems) == 1, problems
    assert problems[0].strip().startswith(f"{where}:") and says in problems[0]


def test_levels_from_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[paths]\nlevels = {1 = 0.3, 2 = 0.4, 3 = 0.3}\npositions_in_minimal = false\n')
    cfg = load_config(path)
    assert cfg.paths.levels == MIX and cfg.paths.positions_in_minimal is False
    # the build.toml a build writes reads back to the same config (same hash: the build is found again)
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())
    assert load_config(again).config_hash() == cfg.config_hash()
    path.write_text("[paths]\nlevels = {1 = 0.3, 5 = 0.7}\n")
    with pytest.raises(ConfigError, match=r"paths\.levels: unknown level '5'"):
        load_config(path)


def test_defaults_leave_the_config_hash_alone():
    """Absent level keys are not in the data (hash, work keys, sample ids of existing builds unchanged);
    set ones are."""
    plain = parse_config({})
    assert not {"levels", "positions_in_minimal", "levels_min_kept"} & set(plain.data_dict()["paths"])
    assert parse_config({"paths": {"positions_in_minimal": "auto"}}).config_hash() == plain.config_hash()
    for paths in ({"levels": MIX}, {"positions_in_minimal": False}, {"levels": MIX, "levels_min_kept": 0.2}):
        cfg = parse_config({"paths": paths})
        assert cfg.config_hash() != plain.config_hash()
        assert cfg.stage_hash("paths") != plain.stage_hash("paths")


# ----------------------------------------------------------------------------------------- quotas


@settings(max_examples=300, deadline=None)
@given(found=st.lists(st.integers(0, 400), min_size=3, max_size=3),
       asked=st.lists(st.integers(0, 10), min_size=3, max_size=3).filter(lambda a: sum(a) > 0),
       min_kept=st.sampled_from([0.0, 0.25, 1.0]))
def test_quotas_reach_the_mix_with_the_largest_selection(found, asked, min_kept):
    n = dict(zip((1, 2, 3), found, strict=True))
    p = parse_levels(dict(zip((1, 2, 3), asked, strict=True)))
    q = quotas(n, p, min_kept)
    assert all(0 <= q[lv] <= n[lv] for lv in (1, 2, 3))
    assert all(q[lv] == 0 for lv in (1, 2, 3) if p[lv] == 0)  # a level asked for 0 keeps nothing
    live = [lv for lv in (1, 2, 3) if p[lv] > 0 and n[lv] > 0]
    if not live:
        assert sum(q.values()) == 0
        return
    supply = sum(n[lv] for lv in live)
    weight = sum(p[lv] for lv in live)
    exact = min(n[lv] * weight / p[lv] for lv in live)  # the largest selection with the mix (absent levels aside)
    total = sum(q.values())
    assert total >= min(supply, round(min_kept * supply) - 1)
    if min_kept == 0.0:
        assert abs(total - exact) <= 1
        for lv in live:  # each level within one row of its exact share
            assert abs(q[lv] - exact * p[lv] / weight) <= 1 + 1e-9
        # the scarcest level (per asked share) is kept whole
        scarce = min(live, key=lambda lv: n[lv] / p[lv])
        assert q[scarce] >= n[scarce] - 1


def test_min_kept_trades_the_mix_for_rows():
    n, p = {1: 10, 2: 300, 3: 90}, parse_levels(MIX)
    exact = quotas(n, p)
    assert exact == {1: 10, 2: 13, 3: 10}
    half = quotas(n, p, 0.5)
    assert sum(half.values()) == 200 and half[1] == 10  # L1 keeps every row it has, and falls short
    assert half[3] / half[2] == pytest.approx(0.3 / 0.4, abs=0.02)  # the others keep their proportion


def test_selection_is_independent_of_order():
    rng = random.Random(7)
    groups = [Group(rng.choice((1, 2, 3)), 1, (rng.randrange(3), f"{rng.getrandbits(40):010x}")) for _ in range(300)]
    quota = {1: 20, 2: 30, 3: 25}
    kept = {groups[j] for j in select(groups, quota)}
    for _ in range(5):
        shuffled = groups[:]
        rng.shuffle(shuffled)
        assert {shuffled[j] for j in select(shuffled, quota)} == kept
    got = Counter(g.level for g in kept)
    assert got == Counter({1: 20, 2: 30, 3: 25})
    for lv in (1, 2, 3):  # lower ranks (a target's first paths) go before higher ones
        ranks_kept = [g.order for g in kept if g.level == lv]
        ranks_left = [g.order for g in groups if g.level == lv and g not in kept]
        if ranks_left:
            assert max(ranks_kept) <= min(ranks_left)


# ------------------------------------------------------------------------------------ unit_paths


@pytest.mark.parametrize("asked", ASKS)
def test_synthetic_scenes_reach_the_asked_mix(synthetic, asked):
    p = PathsConfig(max_hops=2, levels=asked)
    unit = unit_paths(synthetic, p, seed=0)
    kept = level_counts(unit.kept)
    assert sum(kept.values()) >= 40
    assert miss(pct(kept), asked) <= SHORT_POINTS
    # every row kept was found, and each image's paths keep their order
    for (_, _, _, found), chosen in zip(unit.found, unit.kept, strict=True):
        it = iter(found)
        assert all(any(c is f for f in it) for c in chosen)


def test_without_levels_every_path_is_kept_and_positions_stay(synthetic):
    unit = unit_paths(synthetic, PathsConfig(max_hops=2), seed=0)
    assert not unit.positions_excluded
    assert unit.kept == [chosen for *_, chosen in unit.found]
    # exactly the search a build made before the level mix
    image_id, graph, res, _ = unit.found[3]
    seed = int(stable_key(0, image_id, length=8), 16)
    assert referring_paths(graph, max_hops=2, seed=seed, selection=TargetSelection()).paths == res.paths


def test_selection_is_deterministic_and_independent_of_image_order(synthetic):
    p = PathsConfig(max_hops=2, levels=MIX)
    a = unit_paths(synthetic, p, seed=0)
    b = unit_paths(dict(reversed(list(synthetic.items()))), p, seed=0)

    def texts(unit):
        return sorted((image_id, c.target_id, c.text) for (image_id, *_), kept in zip(unit.found, unit.kept, strict=True)
                      for c in kept)

    assert texts(a) == texts(b)
    assert texts(unit_paths(synthetic, p, seed=1)) != texts(a)


def test_auto_leaves_positions_out_only_when_l3_is_asked_beyond_them(synthetic):
    with_pos = unit_paths(synthetic, PathsConfig(max_hops=2, levels={1: 0.3, 2: 0.7}), seed=0)
    assert not with_pos.positions_excluded  # no L3 asked
    auto = unit_paths(synthetic, PathsConfig(max_hops=2, levels=MIX), seed=0)
    forced = unit_paths(synthetic, PathsConfig(max_hops=2, levels=MIX, positions_in_minimal=False), seed=0)
    kept_in = unit_paths(synthetic, PathsConfig(max_hops=2, levels=MIX, positions_in_minimal=True), seed=0)
    assert auto.positions_excluded and forced.positions_excluded and not kept_in.positions_excluded
    found_l3 = [level_counts([f[3] for f in u.found])[3] for u in (kept_in, auto)]
    assert found_l3[1] > 3 * found_l3[0]  # left out, positions no longer resolve would-be L3 targets
    assert sum(level_counts(auto.kept).values()) > sum(level_counts(kept_in.kept).values())


def test_l3_paths_without_positions_are_genuinely_minimal(synthetic, gqa_real):
    """No single allowed constraint (an attribute of the target, or one relation to a bare anchor) resolves an
    L3 target found with positions left out; a positional path there is a fallback: no position-free query
    resolves its target."""
    checked = 0
    for graphs, selection in ((synthetic, {}), (gqa_real, OPEN)):
        p = PathsConfig(max_hops=2, levels=MIX, positions_in_minimal=False, **selection)
        unit = unit_paths(graphs, p, seed=0)
        for image_id, graph, _, chosen in unit.found:
            objects = graph.by_id()
            without = None
            for path in chosen:
                t = objects[path.target_id]
                if path.query.position is not None:
                    if without is None:
                        without = referring_paths(graph, max_hops=2, positions=False, selection=TargetSelection(
                            **{k: tuple(v) if isinstance(v, list) else v for k, v in selection.items()}))
                    assert path.target_id not in without.levels
                    continue
                r = evaluate(graph, path.query)
                assert r.ids == [path.target_id] and not r.ambiguous
                if path.level != 3:
                    continue
                singles = [Node(t.name, (a,)) for a in t.attributes]
                singles += [Node(t.name, (), ((x.predicate, Node(objects[x.object].name)),))
                            for x in graph.relations if x.subject == t.id and x.object in objects and x.object != t.id]
                singles.append(Node(t.name))
                for q in singles:
                    got = evaluate(graph, q)
                    assert got.ids != [t.id] or got.ambiguous, (image_id, path.text, q)
                assert path.constraint_count >= 2
                checked += 1
    assert checked >= 20


def test_real_gqa_excerpt_reaches_the_mix(gqa_real):
    """Real GQA graphs (10 images): with positions in the minimal search L3 is about 1% of the paths; left
    out (auto), the asked mixes are reached within 3 points."""
    plain = unit_paths(gqa_real, PathsConfig(max_hops=2, **OPEN), seed=0)
    assert pct(level_counts(plain.kept))[3] < 3.0
    for asked in (MIX, {1: 0.2, 2: 0.5, 3: 0.3}):
        unit = unit_paths(gqa_real, PathsConfig(max_hops=2, levels=asked, **OPEN), seed=0)
        assert unit.positions_excluded
        kept = level_counts(unit.kept)
        assert sum(kept.values()) >= 30
        assert miss(pct(kept), asked) <= SHORT_POINTS


def test_a_level_the_graphs_do_not_have_is_short_with_a_warning(gqa_fixture):
    """The hand-written GQA fixture has one object per category in each image: every target is L1, so L1
    keeps all it has and the summary says L2 and L3 are short because the graphs do not allow them."""
    p = PathsConfig(max_hops=2, levels=MIX, **OPEN)
    unit = unit_paths(gqa_fixture, p, seed=0)
    found = level_counts([f[3] for f in unit.found])
    assert found[1] >= 8 and found[2] == found[3] == 0
    assert level_counts(unit.kept) == found
    rows = [r for (image_id, graph, _, _), chosen in zip(unit.found, unit.kept, strict=True)
            for r in expressions_for_graph(image_id, graph, chosen, "h")]
    extra = _level_extra(p, unit.found, rows, unit.positions_excluded)
    assert extra["short"] == ["L2", "L3"]
    s = STAGE.summary([{"levels": extra}])["levels"]
    assert s["achieved_pct"] == {"L1": 100.0, "L2": 0.0, "L3": 0.0}
    w2, w3 = s["warnings"]
    assert w3.startswith("level mix: L3 is 30.0 points short (0.0% achieved, 30.0% asked): the scene graphs "
                         "do not allow it: 0 L3 rows found")
    assert "L2 is 40.0 points short" in w2


def test_summary_merges_units_and_warns_only_past_three_points():
    def unit(kept, found=None, short=()):
        return {"asked": {"L1": 0.3, "L2": 0.4, "L3": 0.3}, "found": found or kept, "kept": kept,
                "positions_excluded": True, "short": list(short), "min_kept": 0.0}

    ok = STAGE.summary([{"levels": unit({"L1": 30, "L2": 42, "L3": 28})}, {"levels": unit({"L1": 3, "L2": 4, "L3": 3})}])
    assert ok["levels"]["achieved_pct"] == {"L1": 30.0, "L2": 41.8, "L3": 28.2}
    assert ok["levels"]["warnings"] == [] and "warnings" not in ok
    short = STAGE.summary([{"levels": unit({"L1": 30, "L2": 40, "L3": 30})},
                           {"levels": unit({"L1": 60, "L2": 80, "L3": 0}, short=["L3"])}])
    assert short["levels"]["units_short"]["L3"] == 1
    assert short["warnings"] == short["levels"]["warnings"] and len(short["warnings"]) == 1
    assert short["warnings"][0] == ("level mix: L3 is 17.5 points short (12.5% achieved, 30.0% asked): the scene "
                                    "graphs do not allow it: 30 L3 rows found (12.5% of the rows found); in 1 of 2 "
                                    "units every L3 row was kept and L3 still fell short")
    # a build resumed from a release before the level mix: no counts, no entry
    assert "levels" not in STAGE.summary([{"counts_before": {}}])
    # without [paths] levels: the mix found, nothing asked, no warning
    plain = STAGE.summary([{"levels": {"asked": None, "found": {"L1": 1, "L2": 3, "L3": 0},
                                       "kept": {"L1": 1, "L2": 3, "L3": 0}, "positions_excluded": False}}])
    assert plain["levels"]["asked_pct"] is None and plain["levels"]["achieved_pct"]["L2"] == 75.0
    assert json.loads(json.dumps(short, allow_nan=False)) == short  # strict JSON for the run file


# ------------------------------------------------------------------------------------------ build


def test_a_build_writes_the_mix_it_reports(tmp_path, prefect_api):
    cfg = parse_config(small_config(images=16, shard_size=8, max_hops=2, levels={"1": 0.3, "2": 0.4, "3": 0.3})
                       | {"build": {"name": "levels", "seed": 0, "shard_size": 8, "stages": ["ingest", "paths"]}})
    record = run_build(cfg, tmp_path / "b")
    s = record["stages"]["paths"]["levels"]
    with Catalog(tmp_path / "b") as cat:
        rows = dict(cat.con.execute("SELECT difficulty, count(*) FROM expressions WHERE polarity = 'positive' "
                                    "GROUP BY ALL").fetchall())
    assert s["kept"] == {f"L{lv}": rows.get(lv, 0) for lv in (1, 2, 3)}
    assert s["asked_pct"] == {"L1": 30.0, "L2": 40.0, "L3": 30.0}
    assert s["units_positions_excluded"] == 2
    assert sum(s["kept"].values()) < sum(s["found"].values())
    total = sum(rows.values())
    assert max(abs(100 * rows.get(lv, 0) / total - 100 * MIX[lv]) for lv in (1, 2, 3)) <= SHORT_POINTS
    # the report shows the same numbers: asked and achieved per level
    page = render_report(tmp_path / "b")
    for lv in (1, 2, 3):
        assert (f'data-level="L{lv}" data-asked="{100 * MIX[lv]:.1f}" '
                f'data-achieved="{100 * rows.get(lv, 0) / total:.1f}"') in page


def test_report_shows_the_warning_of_a_short_level():
    run = {"run_id": "r9", "stages": {"paths": {"levels": level_summary([
        {"asked": {"L1": 0.3, "L2": 0.4, "L3": 0.3}, "found": {"L1": 6, "L2": 8, "L3": 0},
         "kept": {"L1": 6, "L2": 8, "L3": 0}, "positions_excluded": True, "short": ["L3"]}])}}}
    mix = report.level_mix([{"run_id": "r0", "stages": {}}, run])
    assert mix["run_id"] == "r9" and mix["excluded"] == 1
    (w,) = mix["warnings"]
    assert w.startswith("level mix: L3 is 30.0 points short (0.0% achieved, 30.0% asked): the scene graphs do not "
                        "allow it")
    assert 'data-level="L3" data-asked="30.0" data-achieved="0.0"' in mix["table"]
    assert report.level_mix([{"stages": {"paths": {}}}]) is None
