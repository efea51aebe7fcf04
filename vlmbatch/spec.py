"""What a job asks for: its settings, free of torch.

The command line, `vlmbatch run`'s TOML specs and the evaluation build these before anything heavy
is needed, so `vlmbatch --help`, a mistyped flag or spec, and scoring saved predictions answer
without importing torch (2-3 s on a small CPU). The pipeline and the engine take them as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_MODEL = "google/paligemma2-3b-mix-224"
DEFAULT_CAPTION_PROMPT = "caption en"
DEFAULT_VQA_TEMPLATE = "answer en {question}"


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 32
    num_beams: int = 1
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    length_penalty: float = 1.0  # beam search only, as in transformers

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.num_beams < 1:
            raise ValueError("num_beams must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.num_beams > 1 and self.temperature > 0:
            raise ValueError("beam search with sampling is not supported: use --num-beams 1 with --temperature")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class JobSpec:
    task: str  # "caption" | "vqa"
    source: str
    out: Path
    model: str = DEFAULT_MODEL
    prompt: str = DEFAULT_CAPTION_PROMPT  # caption
    prompt_template: str = DEFAULT_VQA_TEMPLATE  # vqa
    questions: str | None = None  # vqa: JSONL / CSV / Parquet file
    question: str | None = None  # vqa: one question for every image
    split: str | None = None
    image_column: str | None = None
    id_column: str | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    batch_size: int = 16  # KV-cache slots: sequences decoded together
    device: str = "auto"
    devices: str | None = None  # several devices, one engine process each: "cuda:0,cuda:1" or "all"
    dtype: str | None = None
    cpu_matmul: str = "auto"  # float32 on a CPU: one of blocks.CPU_MATMULS; "auto": the fastest here
    cuda_graph: bool = True  # on CUDA, greedy: each decode step is one replay of a captured CUDA graph
    limit: int | None = None  # at most this many new images this run
    overwrite: bool = False
    workers: int | None = None  # decode processes; 0 decodes in the main process; None: see default_workers
    flush_rows: int = 256  # rows buffered before a part file is written (what a kill can cost)

    @property
    def answer_column(self) -> str:
        return "caption" if self.task == "caption" else "answer"
