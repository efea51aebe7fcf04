"""Declarative job specs (`pipelines/*.toml`) for scheduled runs: `vlmbatch run SPEC.toml`.

A spec names the same things as the command-line flags. Relative paths are taken from the spec
file's folder, so a cron entry works whatever its working directory. So is a relative model path
(`model`, `score_with`): one that starts with '.' or names a folder beside the spec; anything else
is passed on as given (a Hub id, owner/name).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from vlmbatch.errors import VlmbatchError
from vlmbatch.spec import GenerationSettings, JobSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

_PATH_KEYS = ("source", "out", "questions")
_MODEL_KEYS = ("model", "score_with")  # a checkpoint folder beside the spec, or a Hub id
_JOB_KEYS = {f.name for f in dataclasses.fields(JobSpec)} - {"generation"}
_GENERATION_KEYS = {f.name for f in dataclasses.fields(GenerationSettings)}


def load_job_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> JobSpec:
    """Read a TOML job spec; `overrides` (flag-like keys) win over the file. Generation settings may sit
    in a [generation] table or at the top level, as their flags are named; an override names them
    either way (`max_new_tokens` or `generation.max_new_tokens`)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise VlmbatchError(f"job spec not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise VlmbatchError(f"{path}: invalid TOML: {exc}") from None
    generation = raw.pop("generation", {})
    if not isinstance(generation, dict):
        raise VlmbatchError(f"{path}: generation must be a table ([generation])")
    for key in sorted(_GENERATION_KEYS & raw.keys()):
        if key in generation:
            raise VlmbatchError(f"{path}: {key} is set both at the top level and in [generation]")
        generation[key] = raw.pop(key)
    for key, value in (overrides or {}).items():
        name = key.removeprefix("generation.")
        if name in _GENERATION_KEYS:
            generation[name] = value
        else:
            raw[key] = value
    unknown = sorted(set(raw) - _JOB_KEYS) + sorted(f"generation.{k}" for k in set(generation) - _GENERATION_KEYS)
    if unknown:
        raise VlmbatchError(f"{path}: unknown keys {', '.join(unknown)}")
    missing = [k for k in ("task", "source", "out") if k not in raw]
    if missing:
        raise VlmbatchError(f"{path}: missing required keys {', '.join(missing)}")
    for key in _PATH_KEYS:
        value = raw.get(key)
        if isinstance(value, str) and "://" not in value:  # a URI names no path on this machine
            value = os.path.expanduser(value)
            folder = value.endswith(("/", os.sep))  # a trailing '/' says a folder output: kept
            raw[key] = os.path.normpath(path.parent.absolute() / value) + (os.sep if folder else "")
    for key in _MODEL_KEYS:
        model = raw.get(key)
        if isinstance(model, str) and not Path(model).expanduser().is_absolute():
            beside = path.parent.absolute() / model
            if model.startswith(".") or beside.is_dir():
                raw[key] = os.path.normpath(beside)
    try:
        return JobSpec(generation=GenerationSettings(**generation), **raw)
    except (TypeError, ValueError) as exc:
        raise VlmbatchError(f"{path}: {exc}") from None
