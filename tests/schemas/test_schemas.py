import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from refforge.schemas import (
    KEYS,
    SCHEMA_VERSION,
    TABLES,
    Expression,
    Object,
    check_box,
    schema_for,
    validate_arrow,
    validate_records,
)
from refforge.storage import ShardWriter


def test_every_table_has_a_schema_derived_from_its_model():
    for table, model in TABLES.items():
        schema = schema_for(table)
        assert schema.names == list(model.model_fields), table
        assert schema.metadata[b"refforge.schema_version"] == SCHEMA_VERSION.encode()
        assert set(KEYS[table]) <= set(schema.names)
        for name, info in model.model_fields.items():
            # a required pydantic field is a non-nullable column and vice versa
            assert schema.field(name).nullable == (not info.is_required() and info.default is None), (table, name)


def test_boxes_are_fixed_size_lists_and_optional_where_the_model_says():
    assert schema_for("objects").field("box").type == pa.list_(pa.float64(), 4)
    assert not schema_for("objects").field("box").nullable
    assert schema_for("expressions").field("gt_box").nullable
    assert schema_for("images").field("edit").type.field("box").type == pa.list_(pa.float64(), 4)


@pytest.mark.parametrize("box,size,msg", [
    ((5, 1, 2, 3), None, "x1 >= x2"),
    ((1, 3, 2, 3), None, "y1 >= y2"),
    ((-1, 0, 2, 3), None, "outside"),
    ((0, 0, 11, 3), (10, 10), "outside the 10x10"),
    ((0, 0, float("nan"), 3), None, "NaN"),
])
def test_box_invariants(box, size, msg):
    with pytest.raises(ValueError, match=msg):
        check_box(box, size)


def test_object_box_checked_against_image_size_from_context():
    rec = dict(image_id="i", object_id="o", name="ball", box=(1, 1, 20, 3))
    Object.model_validate(rec)  # no size known: fine
    with pytest.raises(ValidationError, match="outside the 10x10 image"):
        Object.model_validate(rec, context={"image_size": (10, 10)})


def test_expression_polarity_rules():
    base = dict(sample_id="s", image_id="i", text="the ball", difficulty=1)
    Expression(**base, polarity="positive", target_object_id="o", gt_box=(0, 0, 1, 1))
    with pytest.raises(ValidationError, match="needs target_object_id and gt_box"):
        Expression(**base, polarity="positive")
    with pytest.raises(ValidationError, match="gt_box must be null"):
        Expression(**base, polarity="negative", negative_type="replace_attribute", gt_box=(0, 0, 1, 1))
    with pytest.raises(ValidationError, match="Extra inputs"):
        Expression(**base, polarity="positive", target_object_id="o", gt_box=(0, 0, 1, 1), colour="red")


def test_validate_records_turns_failures_into_drops_with_reasons():
    good = dict(image_id="i", object_id="o1", name="ball", box=(1, 1, 5, 5))
    bad = dict(image_id="i", object_id="o2", name="ball", box=(5, 1, 5, 5))
    ok, drops = validate_records("objects", [good, bad], stage="ingest")
    assert [o.object_id for o in ok] == ["o1"]
    assert len(drops) == 1
    assert drops[0].key == "i/o2" and drops[0].stage == "ingest"
    assert "zero or negative width" in drops[0].detail


def test_validate_arrow_checks_nulls_literals_constraints_boxes_and_model_rules():
    rows = [
        dict(sample_id="ok", image_id="i", text="the ball", polarity="positive", target_object_id="o",
             gt_box=[1, 2, 3, 4], difficulty=1),
        dict(sample_id="box", image_id="i", text="t", polarity="positive", target_object_id="o",
             gt_box=[3, 2, 1, 4], difficulty=1),
        dict(sample_id="level", image_id="i", text="t", polarity="negative", negative_type="x", gt_box=None,
             difficulty=4),
        dict(sample_id="empty", image_id="i", text="", polarity="negative", negative_type="x", difficulty=2),
        dict(sample_id="pol", image_id="i", text="t", polarity="neutral", difficulty=2),
        dict(sample_id="neg", image_id="i", text="t", polarity="negative", negative_type="x",
             gt_box=[1, 2, 3, 4], difficulty=2),
        dict(sample_id=None, image_id="i", text="t", polarity="negative", negative_type="x", difficulty=2),
    ]
    ok, drops = validate_arrow("expressions", pa.Table.from_pylist(rows), stage="t")
    assert ok.column("sample_id").to_pylist() == ["ok"]
    assert ok.column("needs_review").to_pylist() == [False]  # defaults filled from the model
    reasons = {d.key: d.detail for d in drops}
    assert reasons == {
        "box": "gt_box: x1 >= x2 (zero or negative width)",
        "level": "difficulty must be one of [1, 2, 3]",
        "empty": "text must not be empty",
        "pol": "polarity must be one of ['positive', 'negative']",
        "neg": "a negative expression refers to nothing: gt_box must be null",
        "None": "sample_id is required",
    }


def test_validate_arrow_rejects_unknown_columns():
    with pytest.raises(ValueError, match="unknown columns"):
        validate_arrow("drops", pa.table({"stage": ["a"], "key": ["k"], "reason": ["r"], "oops": [1]}), "t")


def test_shards_carry_schema_version_table_and_work_key(tmp_path):
    w = ShardWriter(tmp_path / "tables", run_id="r1")
    path, drops = w.write("drops", [dict(stage="s", key="k", reason="r")], work_key="wk")
    assert drops == []
    md = pq.read_metadata(path).metadata
    assert md[b"refforge.schema_version"] == SCHEMA_VERSION.encode()
    assert md[b"refforge.table"] == b"drops"
    assert md[b"refforge.work_key"] == b"wk"
    assert pq.read_metadata(path).row_group(0).column(0).compression == "ZSTD"
