"""Caption metrics against pycocoevalcap used the plain documented way, plus SPICE's plumbing.

The golden data are real COCO captions: pycocoevalcap's wheel ships `captions_val2014.json` inside
`spice/spice-1.0.jar`; a deterministic subset is read from it at test time.
"""

from __future__ import annotations

import builtins
import io
import json
import math
import os
import stat
import sys
import textwrap
import urllib.error
import zipfile
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from vlmbatch.errors import VlmbatchError
from vlmbatch.evaluation.metrics import spice as spice_module
from vlmbatch.evaluation.metrics.captions import (
    SCORE_NAMES,
    ptb_tokenize,
    score_captions,
)
from vlmbatch.evaluation.metrics.spice import (
    ADD_OPENS_PACKAGES,
    CORENLP_JARS,
    CORENLP_URLS,
    NASHORN_URLS,
    SpiceRunner,
    SpiceUnavailable,
    find_corenlp_jars,
    parse_java_version,
    provision_corenlp,
    pycocoevalcap_spice_dir,
    read_spice_output,
    write_spice_input,
)

PYCOCOEVALCAP_DIR = pycocoevalcap_spice_dir().parent
GOLDEN_IMAGES = 400


def coco_val_captions() -> dict[str, list[str]]:
    """All captions of COCO val2014 by image id, from the annotation file inside pycocoevalcap's SPICE jar."""
    with zipfile.ZipFile(pycocoevalcap_spice_dir() / "spice-1.0.jar") as jar:
        data = json.loads(jar.read("coco/annotations/captions_val2014.json"))
    captions: dict[str, list[str]] = {}
    for annotation in data["annotations"]:
        captions.setdefault(str(annotation["image_id"]), []).append(annotation["caption"])
    return captions


def perturb(caption: str, index: int) -> str:
    """Make some predictions imperfect in varied ways, so every metric sees non-trivial cases."""
    words = caption.split()
    kind = index % 5
    if kind == 1 and len(words) > 3:
        return " ".join(words[:-2])                       # truncated
    if kind == 2 and len(words) > 2:
        return " ".join(words[1:] + words[:1]).upper()    # rotated, shouting
    if kind == 3:
        return caption + ' (see "photo") -- nice!'        # extra punctuation
    return caption


@pytest.fixture(scope="module")
def golden() -> tuple[dict[str, list[str]], dict[str, str]]:
    """(references, predictions) for 400 evenly spaced COCO val images: one caption predicted, the rest references."""
    captions = coco_val_captions()
    ids = sorted(captions, key=int)[:: len(captions) // GOLDEN_IMAGES][:GOLDEN_IMAGES]
    references = {image_id: captions[image_id][1:] for image_id in ids}
    predictions = {image_id: perturb(captions[image_id][0], n) for n, image_id in enumerate(ids)}
    return references, predictions


def pycocoevalcap_scores(references, predictions) -> dict[str, tuple[float, list[float]]]:
    """The reference numbers, pycocoevalcap's documented way: tokenize gts and res, then each scorer."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    out = {}
    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"Bleu_{n + 1}": (bleu[n], bleu_items[n]) for n in range(4)})
    out["METEOR"] = Meteor().compute_score(gts, res)
    out["ROUGE_L"] = Rouge().compute_score(gts, res)
    out["CIDEr"] = Cider().compute_score(gts, res)
    return out


@pytest.mark.slow
def test_scores_match_pycocoevalcap_on_real_coco_captions(golden, monkeypatch):
    references, predictions = golden
    monkeypatch.setattr(SpiceRunner, "locate", classmethod(lambda cls: _raise_unavailable()))
    ours = score_captions(references, predictions)
    expected = pycocoevalcap_scores(references, predictions)

    assert set(ours.corpus) == set(expected) == set(SCORE_NAMES) - {"SPICE"}
    for name, (score, items) in expected.items():
        assert ours.corpus[name] == pytest.approx(float(score), abs=1e-4), name
        assert ours.per_item[name] == pytest.approx([float(x) for x in items], abs=1e-4), name
    assert ours.image_ids == list(references)
    assert 0 < ours.corpus["Bleu_4"] < ours.corpus["Bleu_1"] < 1
    assert ours.skipped["SPICE"].startswith("SPICE skipped:")


def _raise_unavailable():
    raise SpiceUnavailable("SPICE skipped: Stanford CoreNLP 3.6.0 jars not found in /nowhere; provision them")


def test_tokenizer_matches_ptbtokenizer_in_one_call(golden):
    references, predictions = golden
    ids = list(references)[:50]
    sentences = [c for i in ids for c in references[i]] + [predictions[i] for i in ids]
    expected = PTBTokenizer().tokenize({n: [{"caption": s}] for n, s in enumerate(sentences)})
    assert ptb_tokenize(sentences) == [expected[n][0] for n in range(len(sentences))]


def test_tokenizer_keeps_alignment_when_captions_hold_line_breaks():
    # The Stanford tokenizer ends a line at \r, \v, \f, U+2028 and U+2029 too; PTBTokenizer only replaces
    # "\n", which would shift every later caption onto the wrong image.
    assert ptb_tokenize(["A dog.\rOn grass", "two\u2028cats", "", "Last one!"]) == \
        ["a dog on grass", "two cats", "", "last one"]


# --- Read-only pycocoevalcap install ---------------------------------------------------------------------

def _forbid_writes_under(monkeypatch, root: Path) -> None:
    """Make any Python-level attempt to create or open-for-writing a file under `root` fail, as on a
    read-only install (chmod would not stop root, which tests may run as)."""
    root = root.resolve()

    def inside(path) -> bool:
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(root)
        except (TypeError, ValueError):
            return False

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and inside(file) and set(mode) & set("wax+"):
            raise PermissionError(13, "Read-only file system", os.fsdecode(file))
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            raise PermissionError(13, "Read-only file system", os.fsdecode(path))
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path):
            raise PermissionError(13, "Read-only file system", os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


def _tree(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if "__pycache__" not in path.parts}


@pytest.mark.slow
def test_works_with_a_read_only_pycocoevalcap_install(golden, monkeypatch):
    references, predictions = golden
    references = dict(list(references.items())[:20])
    predictions = {k: predictions[k] for k in references}
    before = _tree(PYCOCOEVALCAP_DIR)
    _forbid_writes_under(monkeypatch, PYCOCOEVALCAP_DIR)

    # The guard is effective: pycocoevalcap's own tokenizer writes its temp file beside its jar.
    with pytest.raises(PermissionError):
        PTBTokenizer().tokenize({"1": [{"caption": "a dog"}]})

    scores = score_captions(references, predictions, metrics=("Bleu", "METEOR", "ROUGE_L", "CIDEr"))
    assert set(scores.corpus) == set(SCORE_NAMES) - {"SPICE"}
    assert _tree(PYCOCOEVALCAP_DIR) == before  # nothing written there, by Python or Java


# --- Inputs ------------------------------------------------------------------------------------------------

def test_rejects_unknown_metric_and_orphan_predictions():
    with pytest.raises(VlmbatchError, match="unknown caption metric 'BLEURT'"):
        score_captions({"1": ["a dog"]}, {"1": "a dog"}, metrics=("BLEURT",))
    with pytest.raises(VlmbatchError, match="no reference captions"):
        score_captions({"1": ["a dog"]}, {"2": "a dog"}, metrics=("Bleu",))
    with pytest.raises(VlmbatchError, match="no predictions"):
        score_captions({"1": ["a dog"]}, {}, metrics=("Bleu",))


def test_spice_skipped_with_reason_when_corenlp_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(spice_module, "default_search_dirs", lambda: [tmp_path])
    scores = score_captions({"1": ["a dog on grass", "a brown dog"]}, {"1": "a dog"}, metrics=("Bleu", "SPICE"))
    assert "SPICE" not in scores.corpus
    reason = scores.skipped["SPICE"]
    assert "\n" not in reason
    assert reason.startswith("SPICE skipped: Stanford CoreNLP 3.6.0 jars not found in ")
    assert str(tmp_path) in reason and "--provision-spice" in reason and "VLMBATCH_CORENLP_DIR" in reason


# --- SPICE ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("output, major", [
    ('java version "1.8.0_392"\nJava(TM) SE Runtime Environment', 8),
    ('openjdk version "1.7.0_80"', 7),
    ('openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment', 17),
    ('openjdk version "21" 2023-09-19', 21),
    ('openjdk version "9-ea"', 9),
    ('openjdk version "11.0.2+9"', 11),
])
def test_parse_java_version(output, major):
    assert parse_java_version(output) == major


def test_parse_java_version_rejects_garbage():
    with pytest.raises(ValueError):
        parse_java_version("command not found")


def _touch(folder: Path, names) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"PK")
    return [folder / name for name in names]


def test_command_line_java_8():
    runner = SpiceRunner(classpath=(Path("/s/spice-1.0.jar"), Path("/c/a.jar")), java="/usr/bin/java", java_version=8)
    assert runner.command(Path("/t/in.json"), Path("/t/out.json")) == [
        "/usr/bin/java", "-Xmx8G", "-cp", f"/s/spice-1.0.jar{os.pathsep}/c/a.jar", "edu.anu.spice.SpiceScorer",
        "/t/in.json", "-out", "/t/out.json", "-subset", "-silent"]


def test_command_line_java_17_opens_packages_and_passes_cache():
    runner = SpiceRunner(classpath=(Path("/s/spice-1.0.jar"),), java_version=17, cache_dir=Path("/cache"), threads=2)
    cmd = runner.command(Path("in.json"), Path("out.json"))
    opens = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--add-opens"]
    assert opens == [f"java.base/{package}=ALL-UNNAMED" for package in ADD_OPENS_PACKAGES]
    assert set(ADD_OPENS_PACKAGES) == {"java.lang", "java.math", "java.util", "java.util.concurrent",
                                       "java.net", "java.text"}
    assert cmd.index("--add-opens") < cmd.index("-cp") < cmd.index("edu.anu.spice.SpiceScorer")
    assert cmd[-4:] == ["-cache", "/cache", "-threads", "2"]


def test_locate_builds_class_path_from_provisioned_jars(monkeypatch, tmp_path):
    corenlp = _touch(tmp_path / "cache", CORENLP_JARS)
    nashorn = _touch(tmp_path / "cache", NASHORN_URLS)
    monkeypatch.setattr(spice_module, "java_major_version", lambda java: 17)
    runner = SpiceRunner.locate([tmp_path / "empty", tmp_path / "cache"])
    spice_dir = pycocoevalcap_spice_dir()
    assert runner.classpath[0] == spice_dir / "spice-1.0.jar"
    assert runner.classpath[1:3] == tuple(corenlp)
    assert spice_dir / "lib" / "json-simple-1.1.1.jar" in runner.classpath
    assert runner.classpath[-len(nashorn):] == tuple(nashorn)
    assert runner.java_version == 17

    monkeypatch.setattr(spice_module, "java_major_version", lambda java: 8)
    assert not set(nashorn) & set(SpiceRunner.locate([tmp_path / "cache"]).classpath)


def test_locate_explains_missing_nashorn_on_new_java(monkeypatch, tmp_path):
    _touch(tmp_path, CORENLP_JARS)
    monkeypatch.setattr(spice_module, "java_major_version", lambda java: 17)
    with pytest.raises(SpiceUnavailable, match=r"^SPICE skipped: Java 17 has no JavaScript engine.*--provision-spice"):
        SpiceRunner.locate([tmp_path])


def test_corenlp_dir_from_environment(monkeypatch, tmp_path):
    jars = _touch(tmp_path / "jars", CORENLP_JARS)
    monkeypatch.setenv("VLMBATCH_CORENLP_DIR", str(tmp_path / "jars"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "no-cache"))
    assert find_corenlp_jars() == jars


def test_provision_downloads_from_maven_central(tmp_path):
    fetched = []

    def fake_fetch(url: str, dest: Path) -> None:
        fetched.append(url)
        dest.write_bytes(b"PK")

    folder = provision_corenlp(tmp_path / "corenlp", fetch=fake_fetch)
    assert fetched == list(CORENLP_URLS.values()) + list(NASHORN_URLS.values())
    assert CORENLP_URLS["stanford-corenlp-3.6.0-models.jar"] == (
        "https://repo1.maven.org/maven2/edu/stanford/nlp/stanford-corenlp/3.6.0/stanford-corenlp-3.6.0-models.jar")
    assert find_corenlp_jars([folder]) == [folder / name for name in CORENLP_JARS]
    fetched.clear()
    provision_corenlp(folder, fetch=fake_fetch)
    assert fetched == []  # already there


def test_provision_offline_is_one_clear_line(tmp_path):
    def offline(url: str, dest: Path) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    with pytest.raises(VlmbatchError) as caught:
        provision_corenlp(tmp_path, fetch=offline)
    message = str(caught.value)
    assert "\n" not in message
    assert "stanford-corenlp-3.6.0.jar" in message and "offline" in message and str(tmp_path) in message


def test_spice_input_format(tmp_path):
    path = tmp_path / "in.json"
    write_spice_input(path, {"7": ["a dog", "a brown dog"], "9": ["two cats"]}, {"7": "a dog", "9": "cats"})
    assert json.loads(path.read_text()) == [
        {"image_id": "7", "test": "a dog", "refs": ["a dog", "a brown dog"]},
        {"image_id": "9", "test": "cats", "refs": ["two cats"]},
    ]


# What spice-1.0.jar writes with -subset: per image, "All" and six tuple subsets, each an Evaluation
# (tp, fp, fn, f, pr, re, numImages); json-simple writes NaN (a subset without reference tuples) as null.
SPICE_OUTPUT = [
    {"image_id": "9", "scores": {
        "All": {"tp": 1, "fp": 1, "fn": 2, "f": 0.4, "pr": 0.5, "re": 1 / 3, "numImages": 1},
        "Color": {"tp": 0, "fp": 0, "fn": 0, "f": None, "pr": None, "re": None, "numImages": 1},
        "Object": {"tp": 1, "fp": 0, "fn": 1, "f": 2 / 3, "pr": 1.0, "re": 0.5, "numImages": 1}}},
    {"image_id": "7", "scores": {
        "All": {"tp": 2, "fp": 0, "fn": 0, "f": 1.0, "pr": 1.0, "re": 1.0, "numImages": 1},
        "Color": {"tp": 0, "fp": 0, "fn": 0, "f": None, "pr": None, "re": None, "numImages": 1},
        "Object": {"tp": 1, "fp": 0, "fn": 0, "f": 1.0, "pr": 1.0, "re": 1.0, "numImages": 1}}},
]


def test_spice_output_parsing(tmp_path):
    path = tmp_path / "out.json"
    path.write_text(json.dumps(SPICE_OUTPUT, indent=2))
    result = read_spice_output(path, ["7", "9"])
    assert result.per_item == [1.0, 0.4]          # in the order asked, not the file's
    assert result.score == pytest.approx(0.7)     # mean of the images' "All" F
    assert math.isnan(result.details[0]["Color"]["f"])
    assert result.details[1]["Object"]["re"] == 0.5
    with pytest.raises(VlmbatchError, match="lacks 1 of 3"):
        read_spice_output(path, ["7", "9", "11"])


def _fake_java(tmp_path: Path) -> Path:
    """An executable standing in for `java`: checks the class path and writes SPICE-format output, F = share
    of the test caption's words found in the references."""
    script = tmp_path / "fake-java"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""
        import json, sys
        args = sys.argv[1:]
        classpath = args[args.index("-cp") + 1]
        assert "edu.anu.spice.SpiceScorer" in args and "stanford-corenlp-3.6.0-models.jar" in classpath
        rows = json.load(open(args[args.index("edu.anu.spice.SpiceScorer") + 1]))
        out = []
        for row in rows:
            words = row["test"].split()
            ref_words = {w for ref in row["refs"] for w in ref.split()}
            f = sum(w in ref_words for w in words) / len(words)
            out.append({"image_id": row["image_id"], "scores": {"All": {"f": f, "pr": f, "re": f}}})
        json.dump(out, open(args[args.index("-out") + 1], "w"))
    """))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_spice_runs_on_tokenized_captions_through_score_captions(tmp_path):
    jars = _touch(tmp_path / "jars", CORENLP_JARS)
    runner = SpiceRunner(classpath=(pycocoevalcap_spice_dir() / "spice-1.0.jar", *jars),
                         java=str(_fake_java(tmp_path)), java_version=8)
    scores = score_captions({"1": ["A dog, on grass."], "2": ["A cat."]}, {"1": "A DOG!", "2": "a bird"},
                            metrics=("SPICE",), spice=runner)
    # Tokenized like every other metric: "A DOG!" -> "a dog", both words in "a dog on grass" -> F 1;
    # "a bird" against "a cat" -> 0.5.
    assert scores.per_item["SPICE"] == [1.0, 0.5]
    assert scores.corpus["SPICE"] == pytest.approx(0.75)
    assert scores.skipped == {}


def test_spice_failure_is_reported(tmp_path):
    broken = tmp_path / "broken-java"
    broken.write_text("#!/bin/sh\necho 'Exception in thread main: boom' >&2\necho '  at Foo.bar' >&2\nexit 1\n")
    broken.chmod(0o755)
    runner = SpiceRunner(classpath=(Path("spice-1.0.jar"),), java=str(broken))
    with pytest.raises(VlmbatchError, match=r"SPICE failed \(exit 1\): Exception in thread main: boom"):
        runner.score({"1": ["a dog"]}, {"1": "a dog"})
    # Inside score_captions the other metrics survive and the failure is reported as a skip.
    scores = score_captions({"1": ["a dog"]}, {"1": "a dog"}, metrics=("Bleu", "SPICE"), spice=runner)
    assert scores.corpus["Bleu_1"] == pytest.approx(1.0)
    assert scores.skipped["SPICE"].startswith("SPICE failed (exit 1): Exception in thread main: boom")
