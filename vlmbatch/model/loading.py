"""Find a PaliGemma checkpoint (local directory or Hub id) and load its safetensors into `PaliGemma`.

Three weight-name layouts are accepted, all renamed to this package's module names by prefix:
the Hub's published one (`vision_tower.vision_model.*`, `language_model.model.*`,
`multi_modal_projector.linear.*`, optional `language_model.lm_head.weight`), the one transformers 5
saves (`vision_tower.*` without `vision_model`), and transformers' in-memory one (`model.*`, `lm_head.*`).
Pickle checkpoints are refused: loading one can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from vlmbatch.errors import VlmbatchError
from vlmbatch.hub import why_unreachable
from vlmbatch.model.blocks import choose_cpu_matmul, use_onednn
from vlmbatch.model.config import PaliGemmaConfig
from vlmbatch.model.gemma import RotaryEmbedding
from vlmbatch.model.memory import available_bytes, total_gb
from vlmbatch.model.paligemma import PaliGemma

# Most specific prefix first: the first rule that matches a name renames it.
_PREFIX_RULES = (
    ("model.vision_tower.vision_model.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.linear.", "projector."),
    ("multi_modal_projector.linear.", "projector."),
    ("language_model.model.", "text."),
    ("model.language_model.", "text."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
)
# Tensors some checkpoints carry that PaliGemma never uses: SigLIP's pooling head (PaliGemma takes the
# patch features), and buffers the model recomputes.
_UNUSED_PREFIXES = ("vision.head.",)
_UNUSED_SUFFIXES = ("rotary_emb.inv_freq", "position_ids")

_CHECKPOINT_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                     "spiece.model", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
                     "processor_config.json", "generation_config.json"]


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint directory and what identifies it."""

    path: Path
    name: str  # what the user passed: a Hub id or a local path

    @cached_property  # read once: the job, the loader and the processor all ask for it
    def config(self) -> PaliGemmaConfig:
        return self.read_config(PaliGemmaConfig, "cannot read config.json: ")

    def read_config(self, kind: type, prefix: str = ""):
        """config.json as `kind` (a config class with `from_json_file`); a missing or invalid file is one
        line naming the checkpoint, then `prefix` and what is wrong."""
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise VlmbatchError(f"{self.name}: no config.json in {self.path}")
        try:
            return kind.from_json_file(config_file)
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            raise VlmbatchError(f"{self.name}: {prefix}{exc}") from None

    def weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (self.path / s).is_file()]
            if missing:
                raise VlmbatchError(f"{self.name}: shards listed in model.safetensors.index.json are missing: "
                                    f"{', '.join(missing)}")
            return [self.path / s for s in shards]
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            return files
        pickles = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt*"))
        if pickles:
            raise VlmbatchError(f"{self.name}: only pickle weights found ({', '.join(pickles)}); vlmbatch loads "
                                "safetensors only, since unpickling can run arbitrary code. Convert the "
                                "checkpoint to safetensors first.")
        raise VlmbatchError(f"{self.name}: no *.safetensors weights in {self.path}")

    def fingerprint(self) -> str:
        """A cheap identity of the weights: each file's name, size and safetensors header, plus its
        last MiB (a full hash of multi-GB files would cost more than loading them)."""
        digest = hashlib.sha256()
        for file in self.weight_files():
            size = file.stat().st_size
            with open(file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                digest.update(file.name.encode() + size.to_bytes(8, "little") + f.read(header_len))
                f.seek(max(0, size - (1 << 20)))
                digest.update(f.read())
        return digest.hexdigest()[:16]


def resolve_checkpoint(model: str) -> Checkpoint:
    """A local directory, or a Hub id fetched into (or found in) the Hugging Face cache."""
    local = Path(model).expanduser()
    if local.is_dir():
        return Checkpoint(local, model)
    if local.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise VlmbatchError(f"model not found: {model} is neither a checkpoint directory nor a Hub id (owner/name)")
    return Checkpoint(_download(model), model)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    unreachable = why_unreachable()  # if so, the cache alone, at once, instead of the library's retry loop
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_CHECKPOINT_FILES, token=os.environ.get("HF_TOKEN"),
                                      local_files_only=unreachable is not None))
    except GatedRepoError:
        raise VlmbatchError(f"{repo_id} is gated: accept its license on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise VlmbatchError(f"model not found on the Hub: {repo_id} (for a gated repo, set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        why = f"{unreachable}, " if unreachable else "offline "
        raise VlmbatchError(f"cannot download {repo_id}: {why}and not in the Hugging Face cache; "
                            "pass a local checkpoint directory with --model") from None
    except OSError as exc:
        raise VlmbatchError(f"cannot download {repo_id}: {exc}") from None


def canonical_name(name: str) -> str | None:
    """This package's parameter name for a checkpoint tensor name, None for a tensor PaliGemma never uses."""
    for prefix, target in _PREFIX_RULES:
        if name.startswith(prefix):
            name = target + name[len(prefix):]
            break
    if name.startswith(_UNUSED_PREFIXES) or name.endswith(_UNUSED_SUFFIXES):
        return None
    return name


def read_state_dict(checkpoint: Checkpoint, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All used tensors of the checkpoint under canonical names."""
    return {target: f.get_tensor(name) for f, name, target in _used_tensors(checkpoint, device)}


def _used_tensors(checkpoint: Checkpoint, device: str | torch.device = "cpu") -> Iterator[tuple[safe_open, str, str]]:
    """(open weight file, name in it, canonical name) of each tensor PaliGemma uses. A file safetensors
    cannot read (one cut short, say) is named in a VlmbatchError."""
    for file in checkpoint.weight_files():
        with open_weights(checkpoint, file, device) as f:
            for name in f.keys():
                target = canonical_name(name)
                if target is not None:
                    yield f, name, target


def open_weights(checkpoint: Checkpoint, file: Path, device: str | torch.device = "cpu") -> safe_open:
    """`file` of the checkpoint opened with safetensors; one it cannot read (one cut short, say) is
    named in a VlmbatchError."""
    try:
        return safe_open(file, framework="pt", device=str(device))
    except (SafetensorError, OSError) as exc:
        raise VlmbatchError(f"{checkpoint.name}: cannot read {file.name} ({exc}); if a download was "
                            "interrupted, delete the file and fetch it again") from None
    except RuntimeError as exc:  # torch maps the whole file, even to read its header
        if "unable to mmap" not in str(exc):
            raise
        raise _unmappable(checkpoint, file) from None


def _unmappable(checkpoint: Checkpoint, file: Path) -> VlmbatchError:
    """The kernel refused to map the file: it is larger than the memory the process may commit."""
    available = available_bytes(torch.device("cpu"))
    memory = f", {total_gb(available)} of memory available" if available is not None else ""
    return VlmbatchError(f"{checkpoint.name}: {file.name} could not be memory-mapped: the file is "
                         f"{total_gb(file.stat().st_size)}{memory}; it needs a machine with more memory, or the "
                         "checkpoint saved in smaller shards")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(checkpoint: Checkpoint, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               cpu_matmul: str = "torch") -> PaliGemma:
    """The checkpoint's model on `device`, for inference. `cpu_matmul` (one of `blocks.CPU_MATMULS`,
    see `blocks.choose_cpu_matmul`) says who multiplies a float32 model's linear layers on a CPU;
    with oneDNN their weights are packed for it and the plain copies released (`blocks.use_onednn`)."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    cfg = checkpoint.config
    state = read_state_dict(checkpoint, device)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the head is the embedding matrix
    _check_layer_counts(checkpoint, state)
    model = _meta_model(cfg)
    _check_tensors(checkpoint, model, {name: tuple(t.shape) for name, t in state.items()})
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.text.embed_tokens.weight
    _rebuild_buffers(model, device)
    matmul = choose_cpu_matmul(cpu_matmul, device, dtype)
    if matmul != "torch":
        use_onednn(model, fused_gelu=matmul == "onednn+gelu")
        _detach_from_file(model)
    return model.eval()


def _detach_from_file(model: PaliGemma) -> None:
    """On a CPU the loaded tensors are views of the memory-mapped checkpoint, and any one of them keeps
    the whole mapping, pages already read included. After packing has read every linear weight, the
    tensors left (embedding, norms, biases) are copied, so the file's pages are not resident beside
    the packed copies (84 of 98 MB on the benchmark's model)."""
    for param in model.parameters():
        if not param.is_meta:
            param.data = param.data.clone()


@contextmanager
def _skip_random_init() -> Iterator[None]:
    """Make `torch.nn.init`'s initialisers no-ops while the model is built: its weights are about to
    be loaded, and on the meta device the initialisers only cost time (they route through torch's
    reference ops, which import the compiler: over a second of start-up)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def weight_shapes(checkpoint: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Canonical name → shape of each tensor the model uses (a tied head left out), from the safetensors
    headers alone. A config whose layer counts the files do not hold is refused here, before anything
    is built for it."""
    shapes = {target: tuple(f.get_slice(name).get_shape()) for f, name, target in _used_tensors(checkpoint)}
    if checkpoint.config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    _check_layer_counts(checkpoint, shapes)
    return shapes


def check_weights(checkpoint: Checkpoint, shapes: dict[str, tuple[int, ...]] | None = None) -> int:
    """Raise what `load_model` would about the checkpoint's tensor names and shapes (`shapes`: those of
    `weight_shapes`, read again if not given), reading only the safetensors headers: a job checks this
    before any work starts, though it loads the weights only once an image needs them. Returns the
    model's number of parameters (a tied head counted once)."""
    shapes = weight_shapes(checkpoint) if shapes is None else shapes
    model = _meta_model(checkpoint.config)
    _check_tensors(checkpoint, model, shapes)
    return sum(param.numel() for param in model.parameters())


def _check_layer_counts(checkpoint: Checkpoint, names: Iterable[str]) -> None:
    """The config's layer counts against the layers the weight files hold. Building the model of a
    config that asks for far more layers than the files have would take minutes and gigabytes, only
    for the tensor check to refuse it; this costs a pass over the names."""
    names = list(names)
    cfg = checkpoint.config
    for prefix, section, wanted in (("text.layers.", "text_config", cfg.text.num_hidden_layers),
                                    ("vision.encoder.layers.", "vision_config", cfg.vision.num_hidden_layers)):
        held = len({name[len(prefix):].partition(".")[0] for name in names if name.startswith(prefix)})
        if held != wanted:
            raise VlmbatchError(f"{checkpoint.name}: weights do not match the config: config.json has "
                                f"{section}.num_hidden_layers = {wanted}, the weight files hold {held} such layers")


def _meta_model(cfg: PaliGemmaConfig) -> PaliGemma:
    """The model's structure, without memory, to load weights into or to check them against."""
    with torch.device("meta"), _skip_random_init():
        return PaliGemma(cfg)


def _check_tensors(checkpoint: Checkpoint, model: PaliGemma, shapes: dict[str, tuple[int, ...]]) -> None:
    """The checkpoint's tensors (canonical name → shape; a tied head left out) against the model's."""
    expected = {name for name, _ in model.named_parameters()}
    if model.cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - shapes.keys()), sorted(shapes.keys() - expected)
    problems = []
    if missing:
        problems.append(f"missing tensors: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_some(unexpected)}")
    if problems:
        raise VlmbatchError(f"{checkpoint.name}: weights do not match the config ({'; '.join(problems)})")
    params = dict(model.named_parameters())
    wrong = [f"{n} {shape} (expected {tuple(params[n].shape)})"
             for n, shape in shapes.items() if shape != tuple(params[n].shape)]
    if wrong:
        raise VlmbatchError(f"{checkpoint.name}: tensor shapes do not match the config: {_some(wrong)}")


def _some(names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _rebuild_buffers(model: PaliGemma, device: torch.device) -> None:
    """Non-persistent buffers are not in the checkpoint; RoPE's were computed on the CPU, move them."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.inv_freq = module.inv_freq.to(device)
