"""From checkpoint tensors, by Hugging Face name, to this rank's parameters.

Our parameter names are Hugging Face's without ``model.``, except for the fused
modules (``FUSED_PARTS``): q/k/v fill ranges of ``qkv_proj``'s output features and
gate/up ranges of ``gate_up_proj``'s. Under tensor parallelism each rank keeps a
slice (``Shard``) of each checkpoint tensor, cut along the axes its linear method
declares (``layers.linear.WeightAxes``):

===================== ==================================== ================================
layer                 keeps of each checkpoint tensor      along
===================== ==================================== ================================
column-parallel       its parts' ranges of output features the output axis
row-parallel          its even share of the input features the input axis (a bias: all)
vocabulary-parallel   its range of the vocabulary          the rows (output axis of a head)
anything else         all of it
===================== ==================================== ================================
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from loomserve.worker.layers.embedding import VocabParallelEmbedding
from loomserve.worker.layers.linear import ColumnParallelLinear, Linear, RowParallelLinear
from loomserve.worker.models.llama import LlamaForCausalLM
from loomserve.worker.parallel import Shard

log = logging.getLogger(__name__)

# Checkpoint modules fused into one of ours, in the order of its output features.
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Checkpoint entries that are derived state, not weights.
_IGNORED_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq",)
_PROGRESS_SECONDS = 5.0


@dataclass(frozen=True)
class WeightTarget:
    """Where one checkpoint tensor goes: after keeping this rank's ``shard`` of it (None: all
    of it), into ``length`` entries of ``param`` along ``dim`` from ``offset``."""

    param: torch.Tensor
    dim: int
    offset: int
    length: int
    full_shape: tuple[int, ...]  # the checkpoint tensor's shape
    shard: Shard | None


def _whole(param: torch.Tensor) -> WeightTarget:
    return WeightTarget(param, 0, 0, param.shape[0], tuple(param.shape), None)


def _with_size(shape: torch.Size, dim: int, size: int) -> tuple[int, ...]:
    return (*shape[:dim], size, *shape[dim + 1 :])


def _linear_targets(name: str, layer: Linear) -> Iterator[tuple[str, WeightTarget]]:
    """(checkpoint name, target) of each parameter of the linear layer named ``name``."""
    parent, _, leaf = name.rpartition(".")
    for kind, param in layer.named_parameters(recurse=False):
        axes = layer.weight_axes[kind]
        if isinstance(layer, ColumnParallelLinear):
            names = [f"{parent}.{part}" for part in FUSED_PARTS[leaf]] if leaf in FUSED_PARTS else [name]
            offset = 0
            for part_name, part in zip(names, layer.parts, strict=True):
                whole = part.length == part.size
                shard = None if whole else Shard(axes.output, part.start, part.length)
                full_shape = _with_size(param.shape, axes.output, part.size)
                yield f"{part_name}.{kind}", WeightTarget(param, axes.output, offset, part.length, full_shape, shard)
                offset += part.length
        elif isinstance(layer, RowParallelLinear) and axes.input is not None:
            local = param.shape[axes.input]
            full_shape = _with_size(param.shape, axes.input, local * layer.tp.size)
            shard = Shard(axes.input, layer.tp.rank * local, local)
            yield f"{name}.{kind}", WeightTarget(param, 0, 0, param.shape[0], full_shape, shard)
        else:
            yield f"{name}.{kind}", _whole(param)


def hf_weight_targets(model: LlamaForCausalLM) -> dict[str, WeightTarget]:
    """Each Hugging Face weight name of ``model``'s checkpoint -> what it fills on this rank.
    A tied model has no ``lm_head.weight`` entry."""
    targets: dict[str, WeightTarget] = {}
    for name, module in model.named_modules():
        hf_name = name if name == "lm_head" else f"model.{name}"
        if isinstance(module, Linear):
            targets.update(_linear_targets(hf_name, module))
        elif isinstance(module, VocabParallelEmbedding):
            shard = Shard(0, module.vocab_start, module.vocab_len)
            full_shape = _with_size(module.weight.shape, 0, module.vocab_size)
            targets[f"{hf_name}.weight"] = WeightTarget(module.weight, 0, 0, shard.length, full_shape, shard)
        else:
            targets.update((f"{hf_name}.{kind}", _whole(p)) for kind, p in module.named_parameters(recurse=False))
    if model.config.tie_word_embeddings:
        del targets["lm_head.weight"]
    return targets


class WeightFiller:
    """Copies checkpoint tensors, by Hugging Face name, into a model's (fused) parameters.

    Tracks what has been filled so a checkpoint with a missing weight fails
    loudly instead of serving uninitialised memory, and logs progress.
    """

    def __init__(self, model: LlamaForCausalLM, source: str) -> None:
        self.targets = hf_weight_targets(model)
        self.tied = model.config.tie_word_embeddings
        self.source = source
        self.filled: set[str] = set()
        self._started = self._last_log = time.monotonic()
        self._next_quarter = 1

    def _target(self, hf_name: str) -> WeightTarget | None:
        target = self.targets.get(hf_name)
        if target is None and not (
            hf_name.endswith(_IGNORED_WEIGHT_SUFFIXES) or (self.tied and hf_name == "lm_head.weight")
        ):
            raise ValueError(f"{self.source}: unexpected weight {hf_name!r} for this model architecture")
        return target

    def shard(self, hf_name: str) -> Shard | None:
        """The slice of this checkpoint tensor this rank keeps (None: all of it); a loader
        that can read a slice alone passes it to ``fill`` with ``sliced=True``."""
        target = self._target(hf_name)
        return None if target is None else target.shard

    @torch.no_grad()
    def fill(self, hf_name: str, tensor: torch.Tensor, *, sliced: bool = False) -> None:
        """Copy a checkpoint tensor (or, with ``sliced``, already this rank's shard of it) in."""
        target = self._target(hf_name)
        if target is None:
            return
        if target.shard is not None and not sliced:
            if tuple(tensor.shape) != target.full_shape:
                raise ValueError(
                    f"{self.source}: weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {target.full_shape}"
                )
            tensor = target.shard.take(tensor)
        param = target.param
        expected = _with_size(param.shape, target.dim, target.length)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{self.source}: weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {expected}")
        # Move first, so a dtype cast runs on the (GPU) target rather than the host.
        param.narrow(target.dim, target.offset, target.length).copy_(tensor.to(param.device))
        self.filled.add(hf_name)
        self._log_progress()

    def _log_progress(self) -> None:
        now = time.monotonic()
        done, total = len(self.filled), len(self.targets)
        quarter_reached = done * 4 >= self._next_quarter * total
        if quarter_reached or now - self._last_log >= _PROGRESS_SECONDS:
            log.info(
                "loading %s: %d/%d weights (%.0f%%), %.1f s",
                self.source,
                done,
                total,
                100.0 * done / total,
                now - self._started,
            )
            self._last_log = now
            while done * 4 >= self._next_quarter * total:
                self._next_quarter += 1

    def check_complete(self) -> None:
        missing = sorted(set(self.targets) - self.filled)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(f"{self.source}: checkpoint lacks {len(missing)} weights: {shown}")
