"""Input row validation: every bad-row kind names file, line and field; every good shape parses."""

from __future__ import annotations

import json

import pytest

from pipeline.common.records import Columns, Record, RecordError, parse_line, read_records, resolve_ref

SPECIFIES = ("pipeline.train.engine.validation",)

FILE = "/data/task/train.jsonl"


def parse(row, line=7, **kw) -> Record:
    return parse_line(row if isinstance(row, str) else json.dumps(row, ensure_ascii=False), FILE, line, **kw)


def bad(row, line=7, **kw) -> RecordError:
    with pytest.raises(RecordError) as info:
        parse(row, line, **kw)
    err = info.value
    assert err.file == FILE and err.line == line
    assert f"{FILE} line {line}" in str(err)
    return err


# --- good rows -------------------------------------------------------------------------------


def test_single_source_string_with_all_texts():
    rec = parse(
        {
            "source_image": "img/a.png",
            "target_image": "img/b.png",
            "instruction": " Make it red. ",
            "instruction_cn": "变红。",
            "inverse_instruction": "Make it blue.",
            "inverse_instruction_cn": "变蓝。",
            "quality": 0.9,
        }
    )
    assert rec.sources == ("/data/task/img/a.png",)
    assert rec.target == "/data/task/img/b.png"
    assert rec.instruction == "Make it red."
    assert rec.inverse_instruction_cn == "变蓝。"
    assert rec.extra == {"quality": 0.9}
    assert rec.num_sources == 1 and rec.line == 7


@pytest.mark.parametrize("sources", [None, [], "a.png", ["a.png"], ["a.png", "b.jpg"], ["a", "b", "c"]])
def test_source_shapes(sources):
    row = {"target_image": "t.png", "instruction": "x"}
    if sources is not None or True:
        row["source_image"] = sources
    rec = parse(row)
    expected = 0 if not sources else (1 if isinstance(sources, str) else len(sources))
    assert rec.num_sources == expected


def test_missing_source_key_is_t2i_and_missing_texts_are_empty():
    rec = parse({"target_image": "t.png"})
    assert rec.sources == ()
    assert rec.texts == {
        "instruction": "",
        "instruction_cn": "",
        "inverse_instruction": "",
        "inverse_instruction_cn": "",
    }
    assert parse({"target_image": "t.png", "instruction": None}).instruction == ""


def test_edit_image_alias_and_column_overrides():
    assert parse({"source_image": "s.png", "edit_image": "e.png"}).target == "/data/task/e.png"
    cols = Columns(source="inputs", target="output")
    rec = parse({"inputs": ["x.png", "y.png"], "output": "o.png", "source_image": "kept"}, columns=cols)
    assert rec.sources == ("/data/task/x.png", "/data/task/y.png")
    assert rec.target == "/data/task/o.png"
    assert rec.extra == {"source_image": "kept"}


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("s3://bucket/k/a.png", "s3://bucket/k/a.png"),
        ("https://example.com/a.png?x=1", "https://example.com/a.png?x=1"),
        ("gs://b/a.png", "gs://b/a.png"),
        ("/abs/a.png", "/abs/a.png"),
        ("../other/a.png", "/data/other/a.png"),
        ("./a.png", "/data/task/a.png"),
    ],
)
def test_references_resolve_against_the_jsonl_folder(ref, expected):
    assert parse({"target_image": ref}).target == expected


def test_relative_refs_in_a_remote_jsonl_stay_remote():
    rec = parse_line(json.dumps({"source_image": "img/a.png", "target_image": "../b.png"}), "s3://bkt/ds/x.jsonl", 0)
    assert rec.sources == ("s3://bkt/ds/img/a.png",)
    assert rec.target == "s3://bkt/b.png"
    assert resolve_ref("a.png", "") == "a.png"


# --- bad rows --------------------------------------------------------------------------------


def test_malformed_json():
    err = bad('{"target_image": "t.png",', line=3)
    assert err.field is None and "malformed JSON" in err.reason


def test_not_an_object():
    err = bad("[1, 2]")
    assert "JSON object" in err.reason


@pytest.mark.parametrize("row", [{"source_image": "s.png"}, {"source_image": "s.png", "target_image": None}])
def test_missing_target(row):
    err = bad(row)
    assert err.field == "target_image" and "missing target" in err.reason
    assert "field 'target_image'" in str(err)


def test_missing_target_names_overridden_column():
    err = bad({"tgt": None}, columns=Columns(target="tgt"))
    assert err.field == "tgt"


@pytest.mark.parametrize(
    "row, field",
    [
        ({"target_image": 5}, "target_image"),
        ({"edit_image": ["a.png"]}, "edit_image"),
        ({"target_image": ""}, "target_image"),
        ({"target_image": "t.png", "source_image": 3}, "source_image"),
        ({"target_image": "t.png", "source_image": {"a": 1}}, "source_image"),
        ({"target_image": "t.png", "source_image": ["a.png", 7]}, "source_image[1]"),
        ({"target_image": "t.png", "source_image": ["a.png", ""]}, "source_image[1]"),
        ({"target_image": "t.png", "instruction": 12}, "instruction"),
        ({"target_image": "t.png", "instruction_cn": ["x"]}, "instruction_cn"),
        ({"target_image": "t.png", "inverse_instruction": {"en": "x"}}, "inverse_instruction"),
        ({"target_image": "t.png", "inverse_instruction_cn": True}, "inverse_instruction_cn"),
    ],
)
def test_wrong_types(row, field):
    err = bad(row)
    assert err.field == field
    assert f"field '{field}'" in str(err)


def test_more_than_three_sources():
    err = bad({"target_image": "t.png", "source_image": ["a", "b", "c", "d"]}, line=41)
    assert err.field == "source_image" and "4 source images" in err.reason and "at most 3" in err.reason
    assert str(err).startswith(f"{FILE} line 41, field 'source_image'")


def test_read_records_reports_line_numbers_and_skips_blank_lines(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(
        '{"source_image": "a.png", "target_image": "b.png"}\n'
        "\n"
        "{broken\n"
        '{"target_image": "c.png", "instruction": "x"}\n',
        encoding="utf-8",
    )
    out = list(read_records(str(jsonl)))
    assert [type(o) for o in out] == [Record, RecordError, Record]
    assert [o.line for o in out] == [0, 2, 3]
    assert out[0].target == str(tmp_path / "b.png")
    assert out[1].to_json()["line"] == 2


def test_validation_rows_are_read_with_the_extraction_schema(tmp_path):
    """One row schema: --validation_jsonl rows parse as extraction rows do (relative paths from the JSONL's folder,
    0-3 sources, the same text fields and errors), with no target required."""
    from pipeline.train.engine.validation import read_rows

    jsonl = tmp_path / "val.jsonl"
    jsonl.write_text(
        '{"source_image": "a.png", "instruction": "paint it red"}\n\n'
        '{"source_image": null, "instruction_cn": "一只猫", "target_image": "t.png"}\n'
    )
    rows = read_rows(str(jsonl))
    assert [(r.line, r.sources, r.instruction) for r in rows] == [
        (1, [str(tmp_path / "a.png")], "paint it red"),
        (3, [], "一只猫"),
    ]
    jsonl.write_text('{"source_image": "a.png", "instruction": "x"}\n{"source_image": ["a", "b", "c", "d"]}\n')
    with pytest.raises(RecordError, match=r"val.jsonl line 1, field 'source_image'"):
        read_rows(str(jsonl))
    jsonl.write_text('{"source_image": "a.png"}\n')
    with pytest.raises(ValueError, match=r"line 0, field 'instruction': missing or empty"):
        read_rows(str(jsonl))


@pytest.mark.parametrize("block", [1, 3, 7, 1 << 20])
def test_lines_are_read_in_blocks_and_an_oversized_one_is_never_held(block):
    """Any file object (fsspec's buffered remote files take no readline size): lines split across blocks, an
    over-long line comes as its size only."""
    import io

    from pipeline.common.records import _bounded_lines

    data = b"a\nbb\n" + b"x" * 50 + b"\nccc\n\nlast"
    assert list(_bounded_lines(io.BytesIO(data), 10, block)) == [b"a\n", b"bb\n", 51, b"ccc\n", b"\n", b"last"]
    assert list(_bounded_lines(io.BytesIO(b"x" * 30), 10, block)) == [30]


def test_iter_lines_numbers_an_oversized_row_and_goes_on(tmp_path):
    from pipeline.common.records import OversizedLine, RecordError, iter_lines, parse_line

    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n' + b'{"blob": "' + b"x" * 5000 + b'"}\n\n{"b": 2}\n')
    lines = list(iter_lines(str(path), max_bytes=1024))
    assert [n for n, _ in lines] == [0, 1, 3] and isinstance(lines[1][1], OversizedLine)
    with pytest.raises(RecordError, match="row too large: 5013 bytes, over the 1024-byte limit"):
        parse_line(lines[1][1], str(path), 1)
