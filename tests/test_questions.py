"""load_questions / group_by_image: every format reads the same questions; bad files give one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmbatch.errors import VlmbatchError
from vlmbatch.sources.questions import group_by_image, load_questions
from vlmbatch.sources.records import Question

ROWS = [
    {"image": "a.png", "question": "What color?", "question_id": "007"},
    {"image": "./sub\\b.png", "question": "How many?", "question_id": "q2"},
    {"image": "a.png", "question": "Where?", "question_id": "q3"},
]
EXPECTED = [
    Question(image="a.png", question="What color?", question_id="007"),
    Question(image="sub/b.png", question="How many?", question_id="q2"),
    Question(image="a.png", question="Where?", question_id="q3"),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    columns = list(rows[0])
    lines = [",".join(columns)] + [",".join(str(row[c]) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


WRITERS = {".jsonl": write_jsonl, ".csv": write_csv, ".parquet": write_parquet}


@pytest.mark.parametrize("suffix", WRITERS)
def test_each_format_reads_the_same_questions(tmp_path: Path, suffix: str) -> None:
    path = WRITERS[suffix](tmp_path / f"questions{suffix}", ROWS)
    assert load_questions(path) == EXPECTED  # ids kept as written ("007"), image keys normalized


@pytest.mark.parametrize("suffix", WRITERS)
def test_missing_question_id_defaults_to_row_index(tmp_path: Path, suffix: str) -> None:
    rows = [{"image": row["image"], "question": row["question"]} for row in ROWS]
    path = WRITERS[suffix](tmp_path / f"questions{suffix}", rows)
    assert [q.question_id for q in load_questions(path)] == ["0", "1", "2"]


def test_non_string_question_ids_become_strings(tmp_path: Path) -> None:
    rows = [{"image": "a.png", "question": "Q?", "question_id": 10}, {"image": 5, "question": "R?"}]
    questions = load_questions(write_jsonl(tmp_path / "q.jsonl", rows))
    assert [(q.image, q.question_id) for q in questions] == [("a.png", "10"), ("5", "1")]
    typed = [{"image": "a.png", "question": "Q?", "question_id": i} for i in (10, 11)]
    from_parquet = load_questions(write_parquet(tmp_path / "q.parquet", typed))
    assert [q.question_id for q in from_parquet] == ["10", "11"]


def test_jsonl_blank_lines_are_not_rows(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps({"image": "c.png", "question": "Hm?"}) + "\n")
    assert [q.question_id for q in load_questions(path)] == ["007", "1"]


def test_group_by_image_keeps_order() -> None:
    groups = group_by_image(EXPECTED)
    assert list(groups) == ["a.png", "sub/b.png"]
    assert [q.question_id for q in groups["a.png"]] == ["007", "q3"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("q.jsonl", '{"image": "a.png"}\n', r"row 1: missing 'question'.*found: image"),
        ("q.csv", "image,prompt\na.png,hi\n", r"row 1: missing 'question'"),
        ("q.jsonl", '{"image": "a.png", "question": ""}\n', r"row 1: 'question' is empty$"),
        ("q.csv", "image,question\na.png,\n", r"row 1: 'question' is empty$"),
        ("q.jsonl", '{"image": null, "question": "why?"}\n', r"row 1: 'image' is empty$"),
        ("q.jsonl", "", "is empty"),
        ("q.csv", "image,question\n", "is empty"),
        ("q.jsonl", '{"image": "a.png", "question": "x"}\nnot json\n', r"line 2: invalid JSON"),
        ("q.jsonl", '["a.png", "x"]\n', "expected a JSON object"),
        ("q.parquet", "not parquet", "cannot read questions file"),
        ("q.txt", "image,question\n", r"unsupported questions file .*\.jsonl, \.csv, \.parquet"),
        (
            "q.jsonl",
            '{"image": "a", "question": "x", "question_id": 1}\n'
            '{"image": "b", "question": "y", "question_id": "1"}\n',
            r"duplicate question_id '1' \(rows 1 and 2\)",
        ),
    ],
    ids=[
        "missing-column-jsonl",
        "missing-column-csv",
        "blank-question",
        "blank-question-csv",
        "null-image",
        "empty-jsonl",
        "header-only-csv",
        "bad-json",
        "not-an-object",
        "corrupt-parquet",
        "unknown-extension",
        "duplicate-ids",
    ],
)
def test_bad_files_raise_one_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(VlmbatchError, match=message) as info:
        load_questions(path)
    assert "\n" not in str(info.value)


def test_default_id_colliding_with_explicit_id_is_a_duplicate(tmp_path: Path) -> None:
    rows = [{"image": "a", "question": "x", "question_id": "1"}, {"image": "b", "question": "y"}]
    with pytest.raises(VlmbatchError, match="duplicate question_id '1'"):
        load_questions(write_jsonl(tmp_path / "q.jsonl", rows))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VlmbatchError, match=r"cannot read questions file .*nope\.csv: No such file"):
        load_questions(tmp_path / "nope.csv")
