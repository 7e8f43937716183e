"""Load a Hugging Face model directory: ``config.json`` plus one or many ``*.safetensors``.

Files are opened with ``safe_open`` (memory-mapped) and read one tensor at a
time, each copied straight into its parameter (q/k/v and gate/up into the
fused modules), so a checkpoint never has to fit in host memory at once. A
tensor-parallel rank reads only its slice of each tensor.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from loomserve.worker.attention.base import AttentionBackend
from loomserve.worker.loader.build import build_model
from loomserve.worker.loader.weights import WeightFiller
from loomserve.worker.model_config import ModelConfig
from loomserve.worker.models.llama import LlamaForCausalLM
from loomserve.worker.parallel import SINGLE, TensorParallel

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


def read_hf_config(directory: Path) -> ModelConfig:
    """The model config of a Hugging Face directory (``generation_config.json`` adds EOS ids)."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{directory} has no config.json; a Hugging Face model directory is expected")
    hf: dict[str, Any] = json.loads(config_path.read_text())
    generation_path = directory / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else None
    return ModelConfig.from_hf_config(hf, name=directory.name, generation_config=generation)


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files: those the index names, else every ``*.safetensors`` in the directory."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{directory}: {INDEX_FILE} names missing files: {', '.join(missing)}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory} has no *.safetensors files")
    return files


def load_safetensors(
    directory: Path,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    attn_backend: type[AttentionBackend],
    tp: TensorParallel = SINGLE,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Load a Hugging Face Llama/Qwen2/Mistral directory (this rank's part of it)."""
    config = read_hf_config(directory)
    files = safetensors_files(directory)
    log.info(
        "safetensors %s: %s, %d layers, hidden %d, %d files",
        directory,
        config.architecture,
        config.num_layers,
        config.hidden_size,
        len(files),
    )
    model = build_model(config, attn_backend, dtype=dtype, device=device, tp=tp)
    filler = WeightFiller(model, directory.name)
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                shard = filler.shard(name)
                if shard is None:
                    filler.fill(name, f.get_tensor(name))
                    continue
                part = f.get_slice(name)
                if tuple(part.get_shape()) != filler.targets[name].full_shape:
                    filler.fill(name, f.get_tensor(name))  # fill() names the shape mismatch
                    continue
                index = (slice(None),) * shard.dim + (slice(shard.start, shard.start + shard.length),)
                filler.fill(name, part[index], sliced=True)
    filler.check_complete()
    return model, config
