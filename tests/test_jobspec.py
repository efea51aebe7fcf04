"""Declarative job specs: the files under pipelines/ load, and `vlmbatch run` runs one."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from factory import real_photos
from typer.testing import CliRunner

from vlmbatch.cli import app
from vlmbatch.errors import VlmbatchError
from vlmbatch.jobspec import load_job_spec

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


@pytest.mark.parametrize("spec", sorted(PIPELINES.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_specs_load(spec):
    job = load_job_spec(spec)
    assert job.task in ("caption", "vqa", "detect")
    assert Path(job.source).is_absolute() and Path(job.out).is_absolute()
    assert Path(job.source).parent.parent == PIPELINES.parent  # relative to the spec's folder


def test_run_command_resumes_over_a_growing_folder(tmp_path, make_ckpt):
    ckpt = make_ckpt("pg1_untied", "hub", image_size=28).path
    photos = list(real_photos().values())
    (tmp_path / "uploads").mkdir()
    photos[0].save(tmp_path / "uploads" / "a.png")
    spec = tmp_path / "job.toml"
    spec.write_text(f'task = "caption"\nsource = "uploads"\nout = "alt.parquet"\nmodel = "{ckpt}"\n'
                    f'workers = 0\n[generation]\nmax_new_tokens = 4\n')
    runner = CliRunner()
    assert runner.invoke(app, ["run", str(spec), "--quiet"]).exit_code == 0
    photos[1].save(tmp_path / "uploads" / "b.png")
    result = runner.invoke(app, ["run", str(spec), "--quiet", "--set", "batch-size=2"])
    assert result.exit_code == 0, result.output
    assert sorted(r["id"] for r in pq.read_table(tmp_path / "alt.parquet").to_pylist()) == ["a.png", "b.png"]


def test_a_relative_model_path_is_taken_from_the_spec_folder_and_a_hub_id_is_left_alone(tmp_path, monkeypatch):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "models" / "pg").mkdir(parents=True)
    (tmp_path / "jobs" / "checkpoints" / "pg").mkdir(parents=True)
    spec = tmp_path / "jobs" / "job.toml"
    monkeypatch.chdir(tmp_path / "models")  # where a relative path would otherwise lead
    cases = {"../models/pg": str(tmp_path / "models" / "pg"), "checkpoints/pg": str(spec.parent / "checkpoints/pg"),
             "google/paligemma2-3b-mix-224": "google/paligemma2-3b-mix-224", "pg": "pg",
             str(tmp_path / "models" / "pg"): str(tmp_path / "models" / "pg")}
    for key in ("model", "score_with"):  # the captioning checkpoint, and the SigLIP one scoring its captions
        for given, expected in cases.items():
            spec.write_text(f'task = "caption"\nsource = "x"\nout = "y.parquet"\n{key} = "{given}"\n')
            assert getattr(load_job_spec(spec), key) == expected, (key, given)


def test_generation_settings_are_set_at_either_level_and_overridden_by_either_name(tmp_path):
    spec = tmp_path / "job.toml"
    spec.write_text('task = "caption"\nsource = "x"\nout = "y.parquet"\nmax_new_tokens = 12\n'
                    '[generation]\nnum_beams = 2\n')
    job = load_job_spec(spec)
    assert (job.generation.max_new_tokens, job.generation.num_beams) == (12, 2)
    job = load_job_spec(spec, {"max_new_tokens": 5, "generation.num_beams": 1, "batch_size": 4})
    assert (job.generation.max_new_tokens, job.generation.num_beams, job.batch_size) == (5, 1, 4)
    spec.write_text('task = "caption"\nsource = "x"\nout = "y.parquet"\nmax_new_tokens = 12\n'
                    '[generation]\nmax_new_tokens = 8\n')
    with pytest.raises(VlmbatchError, match="max_new_tokens is set both at the top level and in"):
        load_job_spec(spec)
    spec.write_text('task = "caption"\nsource = "x"\nout = "y.parquet"\ngeneration = 3\n')
    with pytest.raises(VlmbatchError, match=r"generation must be a table \(\[generation\]\)"):
        load_job_spec(spec)
    spec.write_text('task = "caption"\nsource = "x"\nout = "y.parquet"\n')
    with pytest.raises(VlmbatchError, match="unknown keys generation.beams"):
        load_job_spec(spec, {"generation.beams": 2})


def test_languages_and_alt_text_thresholds_are_keys_like_any_other(tmp_path):
    spec = tmp_path / "alt.toml"
    spec.write_text('task = "caption"\nsource = "x"\nout = "y.parquet"\nlang = ["en", "es"]\nmin_confidence = -1.5\n')
    loaded = load_job_spec(spec, {"max_chars": "100"})
    assert (loaded.lang, loaded.task_prompt, loaded.max_chars, loaded.min_confidence) == (
        ("en", "es"), "caption {lang}", 100, -1.5)
    assert load_job_spec(spec, {"lang": "de,fr"}).lang == ("de", "fr")  # --set lang=de,fr
    spec.write_text('task = "caption"\nsource = "x"\nout = "y.parquet"\nlang = ["en", 3]\n')
    with pytest.raises(VlmbatchError, match="lang must be distinct language codes"):
        load_job_spec(spec)


def test_spec_errors_are_clear(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text('task = "caption"\nsource = "x"\nout = "y.parquet"\ncolour = "blue"\n[generation]\nbeams = 2\n')
    with pytest.raises(VlmbatchError, match="unknown keys colour, generation.beams"):
        load_job_spec(spec)
    spec.write_text('task = "caption"\n')
    with pytest.raises(VlmbatchError, match="missing required keys source, out"):
        load_job_spec(spec)
    with pytest.raises(VlmbatchError, match="not found"):
        load_job_spec(tmp_path / "none.toml")
    spec.write_text('task = "vqa"\nsource = "x"\nout = "y.parquet"\nquestion = "what?"\nscore_with = "s"\n')
    with pytest.raises(VlmbatchError, match="score_with scores captions"):
        load_job_spec(spec)
    result = CliRunner().invoke(app, ["run", str(spec), "--set", "oops"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output


def test_run_help_shows_the_generation_table_rich_would_swallow_as_markup():
    result = CliRunner().invoke(app, ["run", "--help"], terminal_width=200)
    assert result.exit_code == 0 and "under [generation]" in result.output, result.output
