"""`vlmbatch score`: SigLIP's image-text match added to the caption rows of an existing output.

Rows are read back as the sink keeps them (each key's latest row), the images of those still to score
are read again from the source and embedded once each, and each row is written again with its
`siglip_prob`, `siglip_cos` and `siglip_weights` through the output's own resumable sink, with the
settings the output holds: a stopped run resumes, a rerun scores only rows that no run scored (new
captions, captions made again), and the caption job keeps appending to the same output.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from vlmbatch.engine.scorer import Scorer
from vlmbatch.errors import VlmbatchError
from vlmbatch.pipeline import default_workers, resolve_cpu_matmul, resolve_device, resolve_dtype
from vlmbatch.sinks.outputs import open_sink, stored_schema, written_paths
from vlmbatch.sinks.resumable import SETTINGS_KEY, WRITTEN_AT_KEY
from vlmbatch.sinks.rows import CAPTION_SCHEMA, FAILURE_COLUMN, KEYS, VERSION_COLUMN
from vlmbatch.sources.decode import decode_stream
from vlmbatch.sources.open import open_source
from vlmbatch.sources.records import ImageRecord, Source
from vlmbatch.spec import ScoreSpec


@dataclass
class ScoreSummary:
    out: Path
    written: int = 0  # rows scored
    errors: int = 0  # rows whose image could not be read again (left unscored)
    already_done: int = 0  # rows these weights had scored
    unscorable: int = 0  # rows without a caption (error rows): never scored
    changed: int = 0  # rows whose image file was replaced since its caption: caption them again first
    missing: int = 0  # rows whose id the source no longer has
    images: int = 0
    images_skipped: int = 0  # source records with no row to score
    seconds: float = 0.0
    prob_sum: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def mean_prob(self) -> float | None:
        return self.prob_sum / self.written if self.written else None


class ScoreJob:
    """Everything resolved up front (the output, its settings, the source, the weights' headers)."""

    task = "score"

    def __init__(self, spec: ScoreSpec):
        self.spec = spec
        try:
            header = stored_schema(spec.out)
        except (OSError, pa.ArrowException) as exc:
            raise VlmbatchError(f"{spec.out} is not a readable Parquet file ({' '.join(str(exc).split())}); the "
                                "caption job's --recover sets a damaged output aside") from None
        if header is None:
            raise VlmbatchError(f"no output at {spec.out} to score: caption the images first "
                                f"(vlmbatch caption SOURCE --out {spec.out})")
        stored = header.metadata or {}
        if SETTINGS_KEY.encode() not in stored:
            raise VlmbatchError(f"{spec.out} was not written by vlmbatch (no settings in it)")
        settings = json.loads(stored[SETTINGS_KEY.encode()])
        if settings.get("task") != "caption":
            raise VlmbatchError(f"{spec.out} holds {settings.get('task')} answers; vlmbatch score rates captions")
        self.source: Source = open_source(spec.source, split=spec.split, image_column=spec.image_column,
                                          id_column=spec.id_column, confine=spec.confine,
                                          exclude=written_paths(spec.out))
        self.device = resolve_device(spec.device)
        self.dtype = resolve_dtype(spec.dtype, self.device)
        self.scorer = Scorer(spec.model, self.device, self.dtype,
                             resolve_cpu_matmul(spec.cpu_matmul, self.device, self.dtype))
        # The caption run's settings, as stored: the sink checks them against every file, and a caption
        # run appending to the output later finds its own.
        metadata = {key.decode(): value.decode() for key, value in stored.items()
                    if key.startswith(b"vlmbatch.") and key not in (SETTINGS_KEY.encode(), WRITTEN_AT_KEY.encode())}
        metadata["vlmbatch.siglip_model"] = spec.model
        self.sink = open_sink(spec.out, CAPTION_SCHEMA, key=KEYS["caption"], failure_column=FAILURE_COLUMN,
                              version_column=VERSION_COLUMN, settings=settings, metadata=metadata,
                              flush_rows=spec.flush_rows)

    def run(self, progress: Callable[[ScoreSummary], None] | None = None) -> ScoreSummary:
        summary = ScoreSummary(out=Path(self.spec.out))
        started = time.monotonic()
        with self.sink as sink:
            todo = self._rows_to_score(sink, summary)
            for rows in self._scored(todo, summary):
                summary.written += sink.write(rows)
                summary.prob_sum += sum(row["siglip_prob"] for row in rows)
                summary.seconds = time.monotonic() - started
                if progress:
                    progress(summary)
        summary.seconds = time.monotonic() - started
        return summary

    def _rows_to_score(self, sink, summary: ScoreSummary) -> pa.Table:
        """The output's rows that have a caption and no score from these weights. Rows scored by other
        weights are refused, before any work, unless `overwrite` asks to score them again."""
        ours = self.scorer.fingerprint
        kept, others = [], set()
        for batch in sink.latest_batches():
            captioned = pc.and_(pc.is_null(batch.column(FAILURE_COLUMN)), pc.is_valid(batch.column("caption")))
            weights = batch.column("siglip_weights")
            scored_here = pc.fill_null(pc.equal(weights, ours), False)
            summary.unscorable += batch.num_rows - _count(captioned)
            summary.already_done += _count(pc.and_(captioned, scored_here))
            others |= set(pc.unique(weights.filter(pc.and_(pc.is_valid(weights), pc.invert(scored_here)))).to_pylist())
            kept.append(batch.filter(pc.and_(captioned, pc.invert(scored_here))))
        if others and not self.spec.overwrite:
            raise VlmbatchError(f"{self.spec.out} holds scores of other SigLIP weights ({', '.join(sorted(others))}; "
                                f"these are {ours}); use --overwrite to score those rows again with {self.spec.model}")
        return pa.Table.from_batches(kept, schema=CAPTION_SCHEMA)

    def _scored(self, todo: pa.Table, summary: ScoreSummary) -> Iterator[list[dict]]:
        """The rows of `todo`, scored, a batch of images at a time, in the source's order."""
        waiting: dict[str, list[int]] = {}  # id -> its rows' positions in `todo`
        for position, image_id in enumerate(todo.column("id").to_pylist()):
            waiting.setdefault(image_id, []).append(position)
        versions = todo.column(VERSION_COLUMN).to_pylist()

        def items() -> Iterator[tuple[ImageRecord, list[int]]]:
            if not waiting:
                return
            for record in self.source:
                positions = waiting.pop(record.id, None)
                if positions is None:
                    summary.images_skipped += 1
                    continue
                current = [p for p in positions if versions[p] is None or record.version in (None, versions[p])]
                summary.changed += len(positions) - len(current)
                if current:
                    yield record, current
                if not waiting:
                    return

        workers = self.spec.workers if self.spec.workers is not None else default_workers([self.device])
        todo_items = items()
        if self.spec.fetch_images:  # the caption run's fetches are in the cache: read from there, or fetched
            from vlmbatch.sources.fetch import FetchSettings, fetch_stream

            todo_items = ((replace(record, image=image), positions) for (record, positions), image
                          in fetch_stream(todo_items, lambda item: item[0].image, FetchSettings()))
        batch: list[tuple[list[int], object]] = []
        for (record, positions), pixels in decode_stream(todo_items, lambda item: item[0].image,
                                                          self.scorer.image_size, workers):
            summary.images += 1
            if isinstance(pixels, str):  # the image cannot be read now: its rows keep what they have
                summary.errors += len(positions)
                continue
            batch.append((positions, pixels))
            if len(batch) >= self.spec.batch_size:
                yield self._score_batch(todo, batch)
                batch = []
        if batch:
            yield self._score_batch(todo, batch)
        summary.missing += sum(map(len, waiting.values()))

    def _score_batch(self, todo: pa.Table, batch: list[tuple[list[int], object]]) -> list[dict]:
        embeds = self.scorer.image_embeds([pixels for _, pixels in batch])
        image_of = [i for i, (positions, _) in enumerate(batch) for _ in positions]
        rows = todo.take([p for positions, _ in batch for p in positions]).to_pylist()
        scores = self.scorer.score(embeds[image_of], [row["caption"] for row in rows])
        for row, (prob, cos) in zip(rows, scores):
            row.update(siglip_prob=prob, siglip_cos=cos, siglip_weights=self.scorer.fingerprint)
        return rows


def _count(mask: pa.Array) -> int:
    return pc.sum(mask).as_py() or 0  # the sum of no values is null
