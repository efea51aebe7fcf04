"""Shared pytest fixtures: tiny PaliGemma checkpoints built once per session.

Checkpoint fixtures return :class:`factory.Ckpt` (``.path`` = directory with
config.json, safetensors and tokenizer/processor files; ``.hf`` = the
transformers model holding the same weights; ``.ids``, ``.image_seq_length``,
``.processor()``). They are shared by every test of the session: never modify
the model or the files. For tests that damage a checkpoint, build a private one
with ``factory.make_checkpoint(tmp_path, ...)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Let test modules `from factory import ...` whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import factory  # noqa: E402

ORACLE_VERSION = (5, 23)  # see the transformers pin in pyproject.toml


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests that spawn processes or run Java scorers")


def pytest_report_header(config) -> list[str]:
    import transformers

    lines = [f"oracle: transformers {transformers.__version__}"]
    if tuple(int(part) for part in transformers.__version__.split(".")[:2]) < ORACLE_VERSION:
        lines.append(f"WARNING: the oracle is older than {'.'.join(map(str, ORACLE_VERSION))}, the first release "
                     "whose PaliGemma 2 and image processing are the model as specified (see the pin in "
                     "pyproject.toml): PaliGemma 2 logit tests and the pixel test of transparent images "
                     "fail against it")
    return lines


class _CheckpointCache:
    """Builds each distinct (variant, layout, kwargs) checkpoint once per session."""

    def __init__(self, root: Path):
        self.root = root
        self.built: dict[tuple, factory.Ckpt] = {}

    def __call__(self, variant: str, layout: str = "transformers", **kw) -> factory.Ckpt:
        key = (variant, layout, tuple(sorted(kw.items())))
        if key not in self.built:
            path = self.root / f"{variant}-{layout}-{len(self.built)}"
            hf = factory.make_checkpoint(path, variant, layout, **kw)
            image_size = kw.get("image_size", 224)
            self.built[key] = factory.Ckpt(path, hf, variant, layout, image_size)
        return self.built[key]


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory) -> _CheckpointCache:
    """``make_ckpt(variant, layout="transformers", **kw) -> Ckpt``; ``kw`` as for
    ``factory.make_checkpoint`` (image_size, seed, shards, eos_boost, config
    overrides such as sliding_window=8), values hashable. Cached by arguments."""
    return _CheckpointCache(tmp_path_factory.mktemp("ckpts"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """Directory with only the tokenizer + processor files (224 px, 256 image tokens)."""
    path = tmp_path_factory.mktemp("tokenizer")
    factory.make_tokenizer(path, image_size=224)
    return path


@pytest.fixture(scope="session")
def ckpt_pg1_tied(make_ckpt) -> factory.Ckpt:
    """PaliGemma 1 (Gemma), tied lm_head, 224 px, transformers layout."""
    return make_ckpt("pg1_tied")


@pytest.fixture(scope="session")
def ckpt_pg1_untied(make_ckpt) -> factory.Ckpt:
    """PaliGemma 1 (Gemma), separate lm_head, 224 px, transformers layout."""
    return make_ckpt("pg1_untied")


@pytest.fixture(scope="session")
def ckpt_pg2(make_ckpt) -> factory.Ckpt:
    """PaliGemma 2 (Gemma2: soft-capping, sliding window 4096), 224 px, transformers layout."""
    return make_ckpt("pg2")


@pytest.fixture(scope="session")
def ckpt(make_ckpt) -> Path:
    """The end-to-end tests' checkpoint: PaliGemma 1, hub layout, 28 px (4 image tokens), <eos> boosted so
    that captions end at varied lengths."""
    return make_ckpt("pg1_untied", "hub", image_size=28, eos_boost=3.0).path


@pytest.fixture(scope="session")
def photos() -> dict:
    """``factory.real_photos()`` (fresh copies are cheap; don't mutate these)."""
    return factory.real_photos()


@pytest.fixture(scope="session")
def photo_variant_files(tmp_path_factory) -> dict[str, Path]:
    return factory.photo_variants(tmp_path_factory.mktemp("photo_variants"))


@pytest.fixture(scope="session")
def broken_image_files(tmp_path_factory) -> dict[str, Path]:
    return factory.broken_images(tmp_path_factory.mktemp("broken_images"))
