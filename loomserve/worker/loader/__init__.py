"""Model loading: pick the loader for a path (GGUF file, Hugging Face directory) or dummy weights.

``load_model`` returns the model on ``device`` in ``dtype``, in eval mode with
gradients off, and its ``ModelConfig``. Every problem with the input (missing
file, unknown format, unsupported architecture or quant type, missing weight)
is a ``ValueError`` that says what is wrong and what is supported.

Every loader builds an empty model (``build``) and fills it by checkpoint name
through ``weights.WeightFiller``, which keeps this rank's slice of each tensor.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from loomserve.worker.attention.base import AttentionBackend
from loomserve.worker.attention.torch_backend import TorchAttentionBackend
from loomserve.worker.loader.dummy import DUMMY_SHAPES, load_dummy
from loomserve.worker.loader.gguf_loader import load_gguf
from loomserve.worker.loader.safetensors_loader import load_safetensors
from loomserve.worker.model_config import ModelConfig
from loomserve.worker.models.llama import LlamaForCausalLM
from loomserve.worker.parallel import SINGLE, TensorParallel

__all__ = ["DUMMY_SHAPES", "LOAD_FORMATS", "detect_format", "load_model"]

log = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")


def detect_format(path: Path) -> tuple[str, Path]:
    """("gguf" | "safetensors", the file or directory to load) for an existing path."""
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", path
        raise ValueError(f"{path} is not a .gguf file; pass a GGUF file or a Hugging Face directory")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "safetensors", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    raise ValueError(
        f"cannot tell the format of {path}: expected a Hugging Face directory (config.json and "
        f"*.safetensors) or a directory with exactly one .gguf file (found {len(ggufs)})"
    )


def load_model(
    model: str | Path,
    *,
    load_format: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    attn_backend: type[AttentionBackend] = TorchAttentionBackend,
    tp: TensorParallel = SINGLE,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Load ``model`` (a GGUF file, a Hugging Face directory, or for ``load_format="dummy"``
    a name in ``DUMMY_SHAPES``) onto ``device`` in ``dtype``.

    ``seed`` seeds the dummy weights; ``attn_backend`` is the attention
    implementation every layer uses; ``tp`` is this rank's tensor-parallel group,
    of which it loads its share.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; supported: {', '.join(LOAD_FORMATS)}")
    started = time.monotonic()
    if load_format == "dummy":
        loaded = load_dummy(model, dtype=dtype, device=device, seed=seed, attn_backend=attn_backend, tp=tp)
    else:
        path = Path(model).expanduser()
        if not path.exists():
            raise ValueError(
                f"model {str(model)!r} not found: pass a GGUF file or a Hugging Face directory "
                f"(config.json and *.safetensors), or load_format='dummy' with one of "
                f"{', '.join(DUMMY_SHAPES)}"
            )
        detected, path = detect_format(path)
        fmt = detected if load_format == "auto" else load_format
        if fmt != detected:
            raise ValueError(f"{path} looks like {detected}, not the requested {load_format}")
        loader = load_gguf if fmt == "gguf" else load_safetensors
        loaded = loader(path, dtype=dtype, device=device, attn_backend=attn_backend, tp=tp)
    net, config = loaded
    params = sum(p.numel() for p in net.parameters())
    log.info(
        "loaded %s: %.1fM parameters, %s on %s in %.1f s",
        config.name,
        params / 1e6,
        dtype,
        device,
        time.monotonic() - started,
    )
    return net, config
