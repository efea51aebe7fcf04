"""Load a Hugging Face SigLIP checkpoint (`google/siglip-*`, and SigLIP 2 where the layout is the same)
into `SiglipDualEncoder`, safetensors only.

Checkpoints are found as PaliGemma's are (`loading.resolve_checkpoint`); their tensors carry the
model's own names (`vision_model.*`, `text_model.*`, `logit_scale`, `logit_bias`). The config, the
layer counts and every tensor's shape are checked against the safetensors headers before anything is
built, so a PaliGemma checkpoint or a vision-only one is refused in one line saying what it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmbatch.errors import VlmbatchError
from vlmbatch.model.blocks import choose_cpu_matmul, use_onednn
from vlmbatch.model.loading import (
    Checkpoint,
    _skip_random_init,
    default_dtype,
    open_weights,
)
from vlmbatch.model.siglip_dual import SiglipDualConfig, SiglipDualEncoder
from vlmbatch.model.siglip_dual_inputs import (
    SiglipTextProcessor,
    check_image_processing,
    pixel_values,
)

_UNUSED_SUFFIXES = ("position_ids",)  # buffers older exports saved; the model indexes its tables directly


def dual_config(checkpoint: Checkpoint) -> SiglipDualConfig:
    return checkpoint.read_config(SiglipDualConfig)


def weight_shapes(checkpoint: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Name → shape of each tensor the model uses, from the safetensors headers alone."""
    shapes = {}
    for file in checkpoint.weight_files():
        with open_weights(checkpoint, file) as f:
            names = f.keys()
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in names
                           if not name.endswith(_UNUSED_SUFFIXES)})
    return shapes


def check_weights(checkpoint: Checkpoint, cfg: SiglipDualConfig) -> int:
    """Raise what `load_dual_encoder` would about the tensors' names and shapes, reading headers only.
    Returns the number of parameters."""
    return sum(p.numel() for p in _checked_meta_model(checkpoint, cfg).parameters())


def _checked_meta_model(checkpoint: Checkpoint, cfg: SiglipDualConfig) -> SiglipDualEncoder:
    """The model's structure without memory, once the headers were found to hold exactly its tensors."""
    shapes = weight_shapes(checkpoint)
    if not any(name.startswith("text_model.") for name in shapes):
        towers = sorted({name.split(".")[0] for name in shapes})
        raise VlmbatchError(f"{checkpoint.name}: not a SigLIP dual encoder: the weights hold no text tower "
                            f"(text_model.*), only {', '.join(towers[:4])}")
    for prefix, section, wanted in (("text_model.encoder.layers.", "text_config", cfg.text.num_hidden_layers),
                                    ("vision_model.encoder.layers.", "vision_config", cfg.vision.num_hidden_layers)):
        held = len({name[len(prefix):].partition(".")[0] for name in shapes if name.startswith(prefix)})
        if held != wanted:  # before building: a config asking for far more layers would take minutes
            raise VlmbatchError(f"{checkpoint.name}: weights do not match the config: config.json has "
                                f"{section}.num_hidden_layers = {wanted}, the weight files hold {held} such layers")
    with torch.device("meta"), _skip_random_init():
        model = SiglipDualEncoder(cfg)
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    missing, unexpected = sorted(params.keys() - shapes.keys()), sorted(shapes.keys() - params.keys())
    wrong = [f"{n} {shapes[n]} (expected {params[n]})" for n in sorted(params.keys() & shapes.keys())
             if shapes[n] != params[n]]
    problems = [f"{what}: {_some(names)}" for what, names in (("missing tensors", missing),
                                                              ("unexpected tensors", unexpected),
                                                              ("tensor shapes differ", wrong)) if names]
    if problems:
        raise VlmbatchError(f"{checkpoint.name}: weights do not match the config ({'; '.join(problems)})")
    return model


def load_dual_encoder(checkpoint: Checkpoint, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      cpu_matmul: str = "torch") -> SiglipDualEncoder:
    """The checkpoint's dual encoder on `device`, for inference (`cpu_matmul`: see `loading.load_model`).
    `logit_scale` and `logit_bias` stay float32: the score is computed in float32 whatever the towers'."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    cfg = dual_config(checkpoint)
    model = _checked_meta_model(checkpoint, cfg)
    state = {}
    for file in checkpoint.weight_files():
        with open_weights(checkpoint, file, device) as f:
            names = f.keys()
            state.update({name: f.get_tensor(name) for name in names if not name.endswith(_UNUSED_SUFFIXES)})
    keep = {"logit_scale", "logit_bias"}
    model.load_state_dict({k: v.to(torch.float32 if k in keep else dtype) for k, v in state.items()},
                          strict=True, assign=True)
    matmul = choose_cpu_matmul(cpu_matmul, device, dtype)
    if matmul != "torch":
        use_onednn(model, fused_gelu=matmul == "onednn+gelu")
    return model.eval().requires_grad_(False)


def _some(names: list[str], limit: int = 6) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@dataclass(frozen=True)
class SiglipInputs:
    """The checkpoint's text and image preprocessing, checked against its files once."""

    text: SiglipTextProcessor
    image_size: int

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, cfg: SiglipDualConfig) -> SiglipInputs:
        check_image_processing(checkpoint.path, cfg.vision.image_size)
        return cls(SiglipTextProcessor.from_dir(checkpoint.path, cfg.text.max_position_embeddings),
                   cfg.vision.image_size)

    def text_ids(self, texts: list[str]) -> torch.Tensor:
        return self.text.encode(texts)

    def pixel_values(self, images) -> torch.Tensor:
        return pixel_values(images, self.image_size)
