"""Caption metrics with pycocoevalcap's own scorers, reference-exact, run faster and from any install.

`score_captions` gives the numbers `COCOEvalCap.evaluate()` gives (BLEU-1..4, METEOR, ROUGE-L, CIDEr,
SPICE), computed by the same scorer classes on the same PTB-tokenized text; only the driving differs:
one Java tokenizer call for references and predictions together, with its temp file outside the
(possibly read-only) install; METEOR's JVM started first and the Java scorers run in a thread beside the
Python ones; SPICE through `SpiceRunner`, reported as skipped with its reason when it cannot run.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

from vlmbatch.errors import VlmbatchError
from vlmbatch.evaluation.metrics.spice import SpiceRunner, SpiceUnavailable

#: Metric families a caller can ask for, as pycocoevalcap's scorers call themselves ("Bleu" is four scores).
CAPTION_METRICS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
BLEU_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
#: Score names in reporting order, as COCOEvalCap's `eval` dict keys them.
SCORE_NAMES = (*BLEU_NAMES, "METEOR", "ROUGE_L", "CIDEr", "SPICE")

# Characters the Stanford tokenizer treats as line ends. PTBTokenizer.tokenize only replaces "\n", so a
# caption holding one of these silently shifts every later caption onto the wrong image; we replace them.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\u2028\u2029]")

Scored = tuple[float, list[float]]
T = TypeVar("T")


@dataclass
class CaptionScores:
    """Corpus scores keyed as pycocoevalcap keys them, and per-image scores aligned with `image_ids`.

    `skipped` maps a metric that was asked for but could not run (SPICE without CoreNLP) to the reason.
    `timings` holds each stage's wall-clock seconds.
    """

    image_ids: list[str]
    corpus: dict[str, float]
    per_item: dict[str, list[float]]
    skipped: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """PTB-tokenize, lower-case and strip punctuation, exactly as pycocoevalcap's `PTBTokenizer` does.

    Same jar, same flags, same punctuation list; one Java process for all sentences, and the temp file in
    a temp folder of our own so a read-only pycocoevalcap install works.
    """
    if not sentences:
        return []
    jar = Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    text = "\n".join(_LINE_BREAKS.sub(" ", sentence) for sentence in sentences)
    with tempfile.TemporaryDirectory(prefix="vlmbatch-ptb-") as tmp:
        source = Path(tmp) / "captions.txt"
        source.write_bytes(text.encode())
        cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
               "-lowerCase", str(source)]
        try:
            done = subprocess.run(cmd, cwd=tmp, capture_output=True)
        except FileNotFoundError:
            raise VlmbatchError("caption metrics need Java 8 or newer: `java` is not on PATH") from None
    lines = done.stdout.decode().split("\n")
    if done.returncode != 0 or len(lines) < len(sentences):
        detail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise VlmbatchError(f"the PTB tokenizer failed (exit {done.returncode}): {detail[0]}")
    punctuation = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(word for word in line.rstrip().split(" ") if word not in punctuation)
            for line in lines[: len(sentences)]]


def tokenize_pairs(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str],
                   ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Tokenize references and predictions in one call; returns pycocoevalcap's (gts, res) dicts."""
    ids = list(predictions)
    sentences = [ref for image_id in ids for ref in references[image_id]] + [predictions[i] for i in ids]
    tokens = iter(ptb_tokenize(sentences))
    gts = {image_id: [next(tokens) for _ in references[image_id]] for image_id in ids}
    res = {image_id: [next(tokens)] for image_id in ids}
    return gts, res


def _timed(timings: dict[str, float], name: str, run: Callable[[], T]) -> T:
    """`run()`, with its wall-clock seconds recorded under `name`."""
    start = time.perf_counter()
    try:
        return run()
    finally:
        timings[name] = time.perf_counter() - start


def _check_inputs(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str],
                  metrics: Sequence[str]) -> None:
    unknown = [name for name in metrics if name not in CAPTION_METRICS]
    if unknown:
        raise VlmbatchError(f"unknown caption metric {unknown[0]!r}; choose from {', '.join(CAPTION_METRICS)}")
    if not predictions:
        raise VlmbatchError("no predictions to score")
    orphan = next((image_id for image_id in predictions if not references.get(image_id)), None)
    if orphan is not None:
        raise VlmbatchError(f"prediction for image {orphan!r} has no reference captions")


@contextmanager
def _meteor_scorer(wanted: bool) -> Iterator[Meteor | None]:
    """pycocoevalcap's METEOR scorer, its JVM started now (it spends seconds loading its paraphrase table,
    overlapping whatever we do next) and ended on exit rather than whenever `Meteor.__del__` runs."""
    if not wanted:
        yield None
        return
    try:
        meteor = Meteor()
    except FileNotFoundError:
        raise VlmbatchError("caption metrics need Java 8 or newer: `java` is not on PATH") from None
    try:
        yield meteor
    finally:
        if meteor.lock.locked():  # compute_score failed half-way without releasing it; __del__ would hang
            meteor.lock.release()
        with suppress(OSError):
            meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()


def _spice_job(runner: SpiceRunner, gts: dict, res: dict) -> Scored:
    result = runner.score(gts, {image_id: captions[0] for image_id, captions in res.items()})
    return result.score, result.per_item


def _resolve_spice(spice: SpiceRunner | None, skipped: dict[str, str]) -> SpiceRunner | None:
    """The runner to use, or None with the reason recorded in `skipped`."""
    try:
        return spice if spice is not None else SpiceRunner.locate()
    except SpiceUnavailable as exc:
        skipped["SPICE"] = str(exc)
        return None


def score_captions(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str],
                   metrics: Sequence[str] = CAPTION_METRICS, spice: SpiceRunner | None = None) -> CaptionScores:
    """Score each predicted caption against its image's reference captions.

    `references` maps image id to its human captions, `predictions` image id to one generated caption;
    every predicted image must have references (images without a prediction are simply not scored).
    `metrics` picks families from CAPTION_METRICS. SPICE uses `spice`, or `SpiceRunner.locate()`; when it
    cannot run, the result's `skipped` says why and the other metrics are still computed.
    """
    _check_inputs(references, predictions, metrics)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    skipped: dict[str, str] = {}
    spice_runner = _resolve_spice(spice, skipped) if "SPICE" in metrics else None
    results: dict[str, Scored] = {}
    with _meteor_scorer("METEOR" in metrics) as meteor, \
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="vlmbatch-java-scorer") as pool:
        gts, res = _timed(timings, "tokenize", lambda: tokenize_pairs(references, predictions))
        # The Java scorers wait on their subprocess, so they run in threads beside the Python ones.
        java_jobs: dict[str, Future[Scored]] = {}
        if meteor is not None:
            java_jobs["METEOR"] = pool.submit(_timed, timings, "METEOR", lambda: meteor.compute_score(gts, res))
        if spice_runner is not None:
            java_jobs["SPICE"] = pool.submit(_timed, timings, "SPICE", lambda: _spice_job(spice_runner, gts, res))
        if "Bleu" in metrics:
            bleu, bleu_items = _timed(timings, "Bleu", lambda: Bleu(4).compute_score(gts, res, verbose=0))
            results.update({name: (bleu[n], bleu_items[n]) for n, name in enumerate(BLEU_NAMES)})
        if "ROUGE_L" in metrics:
            results["ROUGE_L"] = _timed(timings, "ROUGE_L", lambda: Rouge().compute_score(gts, res))
        if "CIDEr" in metrics:
            results["CIDEr"] = _timed(timings, "CIDEr", lambda: Cider().compute_score(gts, res))
        for name, job in java_jobs.items():
            try:
                results[name] = job.result()
            except VlmbatchError as exc:  # SPICE crashed (Java, memory): keep the other scores, say why
                skipped[name] = str(exc)
    timings["total"] = time.perf_counter() - start

    names = [name for name in SCORE_NAMES if name in results]
    return CaptionScores(
        image_ids=list(gts),
        corpus={name: float(results[name][0]) for name in names},
        per_item={name: [float(value) for value in results[name][1]] for name in names},
        skipped=skipped,
        timings=timings,
    )
