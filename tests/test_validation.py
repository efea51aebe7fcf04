"""Job settings are typed and bounded in one place (vlmbatch.spec): flags, TOML specs and --set alike."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmbatch.cli import app
from vlmbatch.errors import VlmbatchError
from vlmbatch.jobspec import load_job_spec
from vlmbatch.spec import GenerationSettings, JobSpec

runner = CliRunner()
BASE = 'task = "caption"\nsource = "x"\nout = "y.parquet"\n'


def spec_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "job.toml"
    path.write_text(BASE + extra)
    return path


def one_error_line(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("text, expected", [
    ('"no"', False), ('"false"', False), ('"off"', False), ('"0"', False), ('"No"', False), ("false", False),
    ('"yes"', True), ('"TRUE"', True), ('"on"', True), ('"1"', True), ("true", True), ("1", True), ("0", False),
])
def test_booleans_take_toml_booleans_and_the_usual_spellings(tmp_path, text, expected):
    assert load_job_spec(spec_file(tmp_path, f"overwrite = {text}\n")).overwrite is expected


@pytest.mark.parametrize("value, expected", [("no", False), ("false", False), ("off", False), ("0", False),
                                             ("yes", True), ("on", True), ("true", True), ("1", True)])
def test_a_set_boolean_means_what_it_says(tmp_path, value, expected):
    assert load_job_spec(spec_file(tmp_path), {"overwrite": value}).overwrite is expected


def test_set_values_are_typed_by_their_key(tmp_path):
    spec = load_job_spec(spec_file(tmp_path), {"split": "2017", "batch_size": "4", "temperature": "1",
                                               "top_p": "0.5", "seed": "7", "limit": "3.0", "cuda_graph": "off"})
    assert (spec.split, spec.batch_size, spec.limit, spec.cuda_graph) == ("2017", 4, 3, False)
    assert (spec.generation.temperature, spec.generation.top_p, spec.generation.seed) == (1.0, 0.5, 7)
    assert isinstance(spec.generation.temperature, float) and isinstance(spec.out, str)


@pytest.mark.parametrize("extra, message", [
    ('overwrite = "maybe"\n', "overwrite must be a boolean (true/false, yes/no, on/off, 1/0), got 'maybe'"),
    ("overwrite = 2\n", "overwrite must be a boolean (true/false, yes/no, on/off, 1/0), got 2"),
    ("batch_size = 2.5\n", "batch_size must be an integer, got 2.5"),
    ("batch_size = true\n", "batch_size must be an integer, got True"),
    ('batch_size = "many"\n', "batch_size must be an integer, got 'many'"),
    ("flush_rows = [1]\n", "flush_rows must be an integer, got [1]"),
    ('temperature = "hot"\n', "temperature must be a number, got 'hot'"),
    ("temperature = nan\n", "temperature must be a number, got nan"),
    ("split = 2017\n", "split must be a string, got 2017"),
    ("model = 3\n", "model must be a string, got 3"),
])
def test_a_value_of_the_wrong_type_is_one_line_naming_key_value_and_type(tmp_path, extra, message):
    path = spec_file(tmp_path, extra)
    with pytest.raises(VlmbatchError) as caught:
        load_job_spec(path)
    assert str(caught.value) == f"{path}: {message}"
    assert one_error_line(runner.invoke(app, ["run", str(path)])) == f"error: {path}: {message}"


def test_out_must_be_a_path_and_task_caption_or_vqa(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('task = "caption"\nsource = "x"\nout = 5\n')
    with pytest.raises(VlmbatchError, match="out must be a path or URI, got 5"):
        load_job_spec(path)
    path.write_text('task = "summary"\nsource = "x"\nout = "y.parquet"\n')
    message = f"error: {path}: task must be one of caption, vqa, detect, segment, got 'summary'"
    assert one_error_line(runner.invoke(app, ["run", str(path)])) == message


BOUNDS = [("batch_size", "0", "batch_size must be at least 1, got 0"),
          ("max_new_tokens", "0", "max_new_tokens must be at least 1, got 0"),
          ("limit", "0", "limit must be at least 1, got 0"),
          ("flush_rows", "0", "flush_rows must be at least 1, got 0"),
          ("workers", "-1", "workers must be at least 0, got -1"),
          ("temperature", "-0.5", "temperature must be at least 0, got -0.5"),
          ("top_p", "0", "top_p must be in (0, 1], got 0.0"),
          ("top_p", "1.5", "top_p must be in (0, 1], got 1.5"),
          ("num_beams", "0", "num_beams must be at least 1, got 0")]


@pytest.mark.parametrize("key, value, message", BOUNDS)
def test_every_bound_holds_for_specs_and_set(tmp_path, key, value, message):
    path = spec_file(tmp_path, f"{key} = {value}\n")
    assert one_error_line(runner.invoke(app, ["run", str(path)])) == f"error: {path}: {message}"
    path = spec_file(tmp_path)
    flag = key.replace("_", "-")
    assert one_error_line(runner.invoke(app, ["run", str(path), "--set", f"{flag}={value}"])) \
        == f"error: {path}: {message}"


@pytest.mark.parametrize("key, value, message", BOUNDS)
def test_every_bound_holds_for_flags_as_one_line(tmp_path, key, value, message):
    flag = f"--{key.replace('_', '-')}"
    for command in (["caption", str(tmp_path), "--out", str(tmp_path / "o.parquet")],
                    ["eval", "--dataset", "coco", "--data", str(tmp_path / "nothing")]):
        if command[0] == "eval" and key in ("limit", "flush_rows"):
            continue  # eval has its own --limit (items, not images) and no --flush-rows
        assert one_error_line(runner.invoke(app, [*command, flag, value])) == f"error: {message}"


def test_evals_item_limit_is_one_line_too(tmp_path):
    result = runner.invoke(app, ["eval", "--dataset", "coco", "--data", str(tmp_path), "--limit", "0"])
    assert one_error_line(result) == "error: --limit must be at least 1, not 0"


def test_the_dataclasses_check_themselves():
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        JobSpec(task="caption", source="x", out=Path("y"), batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer, got 1.5"):
        GenerationSettings(max_new_tokens=1.5)
    assert JobSpec(task="vqa", source="x", out="y.parquet", limit=2.0).out == "y.parquet"
    assert GenerationSettings(temperature=1, top_p=1).temperature == 1.0
