"""Token selection: one token for each row of a step's logits.

Each engine step the worker holds logits ``(B, V)`` for B requests that may all
want something different: greedy or sampled, seeded or not, with penalties,
biases or logprobs. ``sample`` picks one token per row, and each request keeps
a ``SamplingState`` across steps (its parameters, its tokens so far, and its own
random generator when it asked for a seed).

Order of operations on a row (OpenAI / Hugging Face semantics):

1. ``logit_bias``: the bias of each listed token is added to its logit.
2. ``min_tokens``: while the request has fewer than ``min_tokens`` outputs, its
   ``stop_token_ids`` get logit -inf, so it cannot stop early.
3. ``repetition_penalty`` (CTRL / Hugging Face style), over every token seen in
   the prompt or the output: a positive logit is divided by the penalty, a
   negative one multiplied by it.
4. ``frequency_penalty`` and ``presence_penalty`` (OpenAI formula), over the
   OUTPUT tokens only: ``logit -= count * frequency + (count > 0) * presence``.
5. Logprobs, when asked for, are the ``log_softmax`` of the logits as they stand
   here: after the adjustments above but BEFORE temperature, top-k, top-p and
   min-p. They describe the model's (penalised) distribution, not the truncated
   one the token was drawn from, so a token's logprob does not depend on the
   sampling knobs.
6. Greedy rows (``temperature`` below 1e-5, 0 included) take the argmax.
7. Sampled rows: logits divided by ``temperature``; top-k keeps the tokens whose
   logit is at least the k-th largest; top-p keeps the smallest set of most
   likely tokens whose probability (after top-k, renormalised) reaches
   ``top_p``, always at least one; min-p drops tokens whose probability is below
   ``min_p`` times the largest; a token is then drawn from what is left,
   renormalised. Filters are applied as per-row probability or logit
   thresholds, so tokens tied at a cut-off are all kept.

Drawing uses the exponential race: ``argmax(probs / E)`` with ``E`` i.i.d.
Exponential(1) noise, one value per vocabulary entry, picks token ``i`` with
probability ``probs[i] / sum(probs)``. The noise of a seeded row comes from that
request's own generator, one ``(V,)`` draw per step, indexed by token id, so
its tokens depend only on its seed, its own logits and its step count, never on
the rest of the batch or on the batch order. Unseeded rows share the generator
passed to ``sample`` (torch's default one when none is).

Performance: ``sample`` runs every decode step. A batch of plain greedy rows
(no penalties, bias, logprobs or active ``min_tokens``) costs one argmax. The
rest is vectorised over the batch with per-row parameter tensors; only the
construction of those small tensors, and the per-row noise draw of seeded rows,
loop over requests in Python. Nothing loops over the vocabulary: bias and
``min_tokens`` are one indexed write each, penalties gather and scatter only
the logits of seen tokens, top-k is one ``topk``, top-p one sort (or, when
every top-p row also has a top-k, the ``topk`` already done) and a cumulative
sum. On CUDA the host reads the device once, in ``PendingSample.result``;
``sample_async`` returns before that with the tokens still on the device, so
that the next step can be launched first. Parameters go to the device through
pinned memory without waiting for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from loomserve.shared.messages import SamplingParams, TokenLogprobs

logger = logging.getLogger(__name__)

# Temperatures below this are treated as 0 (greedy): the distribution they give
# is effectively one-hot in float32, and dividing logits by them risks overflow.
GREEDY_TEMPERATURE = 1e-5

# On CPU a full sort of the vocabulary dominates top-p, while a nucleus is
# usually within the few dozen most likely tokens. So a row's nucleus is looked
# for among its 64 likeliest tokens, then 1024, then all of them, each stage
# only for the rows whose candidates do not yet reach top_p (exact at every
# stage). On CUDA the sort is cheap and the checks would each cost a
# host-device synchronisation, so the full sort is used directly.
_CPU_NUCLEUS_STAGES = (64, 1024)

# Seeds are 64-bit on the wire (OpenAI's ``seed``); torch wants them unsigned.
_SEED_MASK = (1 << 64) - 1


def _check_params(params: SamplingParams) -> None:
    """Reject parameters outside their meaningful ranges, so a bad request fails
    alone at creation instead of producing NaNs in a whole batch."""
    if not params.temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {params.temperature}")
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {params.top_k}")
    if not 0.0 <= params.min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {params.min_p}")
    if not params.repetition_penalty > 0.0:
        raise ValueError(f"repetition_penalty must be > 0, got {params.repetition_penalty}")
    if params.logprobs is not None and params.logprobs < 0:
        raise ValueError(f"logprobs must be >= 0, got {params.logprobs}")
    if params.min_tokens < 0:
        raise ValueError(f"min_tokens must be >= 0, got {params.min_tokens}")


class SamplingState:
    """What the worker keeps about one request's sampling, from its first step to its last.

    ``output_token_ids`` holds the tokens generated so far; the worker calls
    ``append_output`` with each token ``sample`` picks for this request. A
    request rebuilt after preemption passes its earlier outputs: a seeded one
    then skips the random draws those outputs used, so it continues exactly as
    if it had never been interrupted.

    ``device`` is where the request's logits live; a seeded request's generator
    is created there, since torch draws on a device only from a generator of
    that device.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int] = (),
        device: torch.device | str = "cpu",
    ) -> None:
        _check_params(params)
        self.params = params
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids = list(output_token_ids)
        self.device = torch.device(device)
        self.is_greedy = params.temperature < GREEDY_TEMPERATURE
        self.has_penalties = (
            params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
        )
        self.generator: torch.Generator | None = None
        # Draws owed by a resumed seeded request, taken before its next real one.
        self._pending_draws = 0
        if params.seed is not None:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(params.seed & _SEED_MASK)
            if not self.is_greedy:
                self._pending_draws = len(self.output_token_ids)
        self._prompt_ids: torch.Tensor | None = None
        self._vocab_lists: tuple[int, list[int], list[float], list[int]] | None = None

    def append_output(self, token_id: int) -> None:
        """Record a generated token (penalties and ``min_tokens`` count it from the next step)."""
        self.output_token_ids.append(token_id)

    @property
    def min_tokens_active(self) -> bool:
        """Whether the stop tokens are still masked this step."""
        return len(self.output_token_ids) < self.params.min_tokens and len(self.params.stop_token_ids) > 0

    def _prompt_ids_on(self, device: torch.device) -> torch.Tensor:
        """Prompt ids as a tensor, built once: the prompt never changes and can be long."""
        if self._prompt_ids is None or self._prompt_ids.device != device:
            self._prompt_ids = _to_device(self.prompt_token_ids, torch.long, device)
        return self._prompt_ids

    def _vocab_token_lists(self, vocab_size: int) -> tuple[list[int], list[float], list[int]]:
        """``logit_bias`` ids and values, and stop ids, restricted to ``[0, vocab_size)``.

        Computed once: an id outside the vocabulary would make the device-side
        scatter fail for the whole batch, so it is dropped with one warning.
        """
        if self._vocab_lists is None or self._vocab_lists[0] != vocab_size:
            bias = self.params.logit_bias or {}
            bias_ids = [t for t in bias if 0 <= t < vocab_size]
            stop_ids = [t for t in self.params.stop_token_ids if 0 <= t < vocab_size]
            if len(bias_ids) < len(bias) or len(stop_ids) < len(self.params.stop_token_ids):
                logger.warning(
                    "token ids outside the vocabulary (size %d) ignored in logit_bias %s or stop_token_ids %s",
                    vocab_size,
                    sorted(set(bias) - set(bias_ids)),
                    sorted(set(self.params.stop_token_ids) - set(stop_ids)),
                )
            self._vocab_lists = (vocab_size, bias_ids, [bias[t] for t in bias_ids], stop_ids)
        return self._vocab_lists[1], self._vocab_lists[2], self._vocab_lists[3]

    def _draw_noise(self, row: torch.Tensor) -> None:
        """Fill ``row`` (V,) with this request's uniform draw for the step."""
        assert self.generator is not None
        for _ in range(self._pending_draws + 1):
            row.uniform_(generator=self.generator)
        self._pending_draws = 0


@dataclass
class SamplerOutput:
    """One step's picks: ``token_ids[i]`` and ``logprobs[i]`` belong to row i of the logits."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def _to_device(
    values: Sequence[float] | Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A small host-built tensor on ``device``, without a host-device synchronisation."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    # A copy from pinned memory is queued on the stream; a pageable one would
    # wait for the GPU to finish everything before it (the model's forward).
    return host.pin_memory().to(device, non_blocking=True)


def _apply_penalties(x: torch.Tensor, rows: list[int], states: list[SamplingState]) -> None:
    """Repetition, frequency and presence penalties, in place on ``rows`` of ``x`` (B, V).

    Only the logits of seen tokens are touched: gathered through padded id
    tensors, changed, scattered back. Padding points at an extra sink column V,
    dropped at the end. An id repeated in a row gathers the same logit and
    writes back the same value, so the scatter is deterministic.
    """
    device = x.device
    n, vocab = len(rows), x.shape[1]
    index = None if n == x.shape[0] else _to_device(rows, torch.long, device)
    sub = x if index is None else x.index_select(0, index)  # (n, V)
    owners = [states[r] for r in rows]
    extended = torch.cat([sub, sub.new_zeros(n, 1)], dim=1)  # (n, V + 1), last column the sink

    width = max(len(st.output_token_ids) for st in owners)
    out_ids = _to_device(
        [st.output_token_ids + [vocab] * (width - len(st.output_token_ids)) for st in owners],
        torch.long,
        device,
    )  # (n, longest output)

    repetition = [st.params.repetition_penalty for st in owners]
    if any(r != 1.0 for r in repetition):
        prompt_ids = pad_sequence(
            [st._prompt_ids_on(device) for st in owners], batch_first=True, padding_value=vocab
        )  # (n, longest prompt)
        seen = torch.cat([prompt_ids, out_ids], dim=1)  # (n, longest prompt + longest output)
        penalty = _to_device(repetition, torch.float32, device).unsqueeze(1)  # (n, 1)
        values = extended.gather(1, seen)
        extended.scatter_(1, seen, torch.where(values > 0, values / penalty, values * penalty))

    frequency = [st.params.frequency_penalty for st in owners]
    presence = [st.params.presence_penalty for st in owners]
    if width and (any(frequency) or any(presence)):
        counts = torch.zeros(n, vocab + 1, device=device)
        counts.scatter_add_(1, out_ids, torch.ones(out_ids.shape, device=device))
        count = counts.gather(1, out_ids)  # (n, longest output): occurrences of each output id, >= 1
        freq_t = _to_device(frequency, torch.float32, device).unsqueeze(1)  # (n, 1)
        pres_t = _to_device(presence, torch.float32, device).unsqueeze(1)  # (n, 1)
        values = extended.gather(1, out_ids)
        extended.scatter_(1, out_ids, values - (count * freq_t + pres_t))

    if index is None:
        x.copy_(extended[:, :vocab])
    else:
        x.index_copy_(0, index, extended[:, :vocab])


def _nucleus_threshold(head: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest probability inside each row's top-p nucleus, from its most likely tokens.

    head (n, K): each row's K largest probabilities, descending; top_p (n,).
    Returns the threshold (n, 1) and the head's total mass (n,). The threshold
    is exact for a row whose head mass reaches its ``top_p``, or whose tokens
    beyond the head have probability 0 or tie with the head's last one.
    """
    cumulative = head.cumsum(dim=-1)  # (n, K)
    # The most likely token is always kept; each later one while the mass of
    # those before it is still below top_p.
    kept = 1 + (cumulative[:, :-1] < top_p.unsqueeze(1)).sum(dim=-1, keepdim=True)  # (n, 1)
    return head.gather(1, kept - 1), cumulative[:, -1]


def _top_p_cutoff(
    probs: torch.Tensor, top_p: torch.Tensor, nucleus_rows: list[int], candidate_ids: torch.Tensor | None
) -> torch.Tensor:
    """Per-row probability below which top-p drops a token: (n, 1), 0 for rows without top-p.

    probs (n, V) after top-k; top_p (n,); ``nucleus_rows`` are the rows with
    top_p < 1. ``candidate_ids`` (n, K), when given, index each row's K largest
    logits, descending, and hold every top-p row's nucleus; otherwise the
    nucleus is looked for over the whole vocabulary.
    """
    n, vocab = probs.shape
    if candidate_ids is not None:
        # Probabilities follow the logits' order, so these are already sorted.
        threshold, _ = _nucleus_threshold(probs.gather(1, candidate_ids), top_p)
    elif probs.device.type != "cpu":
        threshold, _ = _nucleus_threshold(probs.sort(dim=-1, descending=True).values, top_p)
    else:
        threshold = probs.new_zeros(n, 1)
        pending = nucleus_rows
        for size in (*(stage for stage in _CPU_NUCLEUS_STAGES if stage < vocab), vocab):
            rows = torch.tensor(pending)
            stage_probs = probs if len(pending) == n else probs.index_select(0, rows)
            stage_p = top_p.index_select(0, rows)
            if size < vocab:
                head = stage_probs.topk(size, dim=-1).values  # (pending, size), descending
            else:
                head = stage_probs.sort(dim=-1, descending=True).values  # (pending, V)
            stage_threshold, mass = _nucleus_threshold(head, stage_p)
            found = (mass >= stage_p).tolist() if size < vocab else [True] * len(pending)
            done = [j for j, ok in enumerate(found) if ok]
            threshold.index_copy_(0, rows[done], stage_threshold[done])
            pending = [row for row, ok in zip(pending, found, strict=True) if not ok]
            if not pending:
                break
    return torch.where(top_p.unsqueeze(1) < 1.0, threshold, 0.0)


def _noise(
    shape: tuple[int, int],
    states: list[SamplingState],
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """Exponential(1) noise (n, V): each seeded row from its own generator, the others shared."""
    noise = torch.empty(shape, device=device)
    seeded = [i for i, st in enumerate(states) if st.generator is not None]
    if len(seeded) < len(states):
        noise.uniform_(generator=generator)
    for i in seeded:
        states[i]._draw_noise(noise[i])
    # -log(U) with U in [0, 1): the noise is in (0, inf], never 0, so a token of
    # probability 0 scores exactly 0 and cannot win.
    return noise.log_().neg_()


def _row_argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's maximum, x (n, V) -> (n,); the first one on ties.

    ``max(dim)`` rather than ``argmax``: same result, about twice as fast on CPU.
    """
    return x.max(dim=-1).indices


def _sample_rows(x: torch.Tensor, states: list[SamplingState], generator: torch.Generator | None) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then one draw per row. x (n, V) -> tokens (n,)."""
    device = x.device
    vocab = x.shape[1]
    params = [st.params for st in states]

    temperature = _to_device([p.temperature for p in params], torch.float32, device)
    x = x / temperature.unsqueeze(1)  # (n, V), our own copy from here on

    # A top_k of 0, or one covering the whole vocabulary, filters nothing.
    top_k = [p.top_k if p.top_k < vocab else 0 for p in params]
    top_k_ids = None
    if any(top_k):
        k = _to_device(top_k, torch.long, device).unsqueeze(1)  # (n, 1)
        largest = x.topk(max(top_k), dim=-1)  # (n, max k) values and indices, descending
        kth = torch.where(k > 0, largest.values.gather(1, (k - 1).clamp(min=0)), float("-inf"))  # (n, 1)
        x.masked_fill_(x < kth, float("-inf"))
        top_k_ids = largest.indices

    probs = x.softmax(dim=-1)  # (n, V)

    # Top-p and min-p both keep the tokens at or above a per-row probability,
    # so they share one cutoff and one masking pass.
    cutoff: torch.Tensor | None = None
    nucleus_rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if nucleus_rows:
        top_p = _to_device([p.top_p for p in params], torch.float32, device)  # (n,)
        # A row with top-k keeps its k most likely tokens (plus ties with the
        # k-th, which the threshold keeps anyway), so its nucleus is among them.
        candidate_ids = None
        if top_k_ids is not None and all(top_k[i] for i in nucleus_rows):
            candidate_ids = top_k_ids[:, : max(top_k[i] for i in nucleus_rows)]
        cutoff = _top_p_cutoff(probs, top_p, nucleus_rows, candidate_ids)
    if any(p.min_p > 0.0 for p in params):
        min_p = _to_device([p.min_p for p in params], torch.float32, device).unsqueeze(1)  # (n, 1)
        # Top-k and top-p never drop the most likely token, so this is its probability either way.
        min_p_cutoff = min_p * probs.amax(dim=-1, keepdim=True)  # (n, 1)
        cutoff = min_p_cutoff if cutoff is None else torch.maximum(cutoff, min_p_cutoff)
    if cutoff is not None:
        # Multiplying by the keep mask is faster on CPU than masked_fill.
        probs.mul_(probs >= cutoff)

    # Exponential race: dividing by Exp(1) noise and taking the argmax draws
    # from probs / probs.sum() without renormalising.
    return _row_argmax(probs.div_(_noise((x.shape[0], vocab), states, generator, device)))


def _check_batch(logits: torch.Tensor, states: list[SamplingState]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not match {len(states)} sampling states")


def _needs_adjustment(state: SamplingState) -> bool:
    return state.has_penalties or bool(state.params.logit_bias) or state.min_tokens_active


def adjust_logits(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Steps 1-4 of the module docstring: logit bias, ``min_tokens`` masking,
    repetition, frequency and presence penalties.

    logits (B, V) -> float32 (B, V). The caller's tensor is never modified; it
    comes back as is (cast to float32) when no row needs an adjustment.
    """
    _check_batch(logits, states)
    vocab = logits.shape[1]
    penalty_rows: list[int] = []
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias_values: list[float] = []
    masked_rows: list[int] = []
    masked_ids: list[int] = []
    for i, st in enumerate(states):
        if st.has_penalties:
            penalty_rows.append(i)
        if st.params.logit_bias or st.min_tokens_active:
            ids, values, stop_ids = st._vocab_token_lists(vocab)
            if st.params.logit_bias:
                bias_rows += [i] * len(ids)
                bias_ids += ids
                bias_values += values
            if st.min_tokens_active:
                masked_rows += [i] * len(stop_ids)
                masked_ids += stop_ids

    adjusted = bool(penalty_rows or bias_rows or masked_rows)
    x = logits.to(torch.float32, copy=adjusted)  # (B, V), our own copy when edited in place
    device = x.device
    if bias_rows:
        where = _to_device([bias_rows, bias_ids], torch.long, device)  # (2, entries): row, token
        x.index_put_((where[0], where[1]), _to_device(bias_values, torch.float32, device), accumulate=True)
    if masked_rows:
        where = _to_device([masked_rows, masked_ids], torch.long, device)  # (2, entries)
        x.index_put_((where[0], where[1]), torch.full((), float("-inf"), device=device))
    if penalty_rows:
        _apply_penalties(x, penalty_rows, states)
    return x


def sample(
    logits: torch.Tensor,
    states: list[SamplingState],
    generator: torch.Generator | None = None,
) -> SamplerOutput:
    """Pick one token for each row of ``logits`` (B, V); row i belongs to ``states[i]``.

    ``generator`` drives the unseeded sampled rows (torch's default generator
    when None); it must live on the logits' device. The states are only read
    (and a seeded state's generator advanced): recording the picked tokens with
    ``append_output`` is the caller's job. ``logits`` is not modified.
    """
    return sample_async(logits, states, generator).result()


class PendingSample:
    """A step's picks, still on their way to the host.

    ``tokens`` (B,) int64 stays on the logits' device, where the next step can take
    its inputs from it before the host has seen them; ``result`` waits for the
    copy to the host (the step's one device synchronisation) and decodes it.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        packed: torch.Tensor,
        logprob_rows: list[int],
        top_ks: list[int],
        num_top: int,
    ) -> None:
        self.tokens = tokens
        self._logprob_rows = logprob_rows
        self._top_ks = top_ks
        self._num_top = num_top
        self._ready: torch.cuda.Event | None = None
        self.wait_s = 0.0  # how long ``result`` waited for the copy, once called
        if packed.device.type == "cuda":
            # Into pinned memory, queued on the stream: the host goes on until ``result``.
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = packed.cpu()

    def result(self) -> SamplerOutput:
        if self._ready is not None:
            began = time.perf_counter()
            self._ready.synchronize()
            self.wait_s = time.perf_counter() - began
        host = self._host.tolist()
        batch = int(self.tokens.shape[0])
        token_ids = [int(t) for t in host[:batch]]
        out_logprobs: list[TokenLogprobs | None] = [None] * batch
        m, num_top = len(self._logprob_rows), self._num_top
        top_ids = host[batch + m : batch + m + m * num_top]
        top_values = host[batch + m + m * num_top :]
        for j, (i, k) in enumerate(zip(self._logprob_rows, self._top_ks, strict=True)):
            start = j * num_top
            out_logprobs[i] = TokenLogprobs(
                logprob=host[batch + j],
                top_token_ids=[int(t) for t in top_ids[start : start + k]],
                top_logprobs=top_values[start : start + k],
            )
        return SamplerOutput(token_ids=token_ids, logprobs=out_logprobs)


def sample_async(
    logits: torch.Tensor,
    states: list[SamplingState],
    generator: torch.Generator | None = None,
) -> PendingSample:
    """``sample`` without waiting for the device: the picks as a ``PendingSample``."""
    _check_batch(logits, states)
    batch, vocab = logits.shape
    greedy_rows = [i for i, st in enumerate(states) if st.is_greedy]
    sampled_rows = [i for i, st in enumerate(states) if not st.is_greedy]
    logprob_rows = [i for i, st in enumerate(states) if st.params.logprobs is not None]
    adjust = any(_needs_adjustment(st) for st in states)
    if not (adjust or sampled_rows or logprob_rows):
        tokens = _row_argmax(logits)
        return PendingSample(tokens, tokens, [], [], 0)

    device = logits.device
    x = adjust_logits(logits, states) if adjust else logits.float()  # (B, V)

    if not sampled_rows:
        tokens = _row_argmax(x)  # (B,)
    else:
        sampled_states = [states[i] for i in sampled_rows]
        if not greedy_rows:
            tokens = _sample_rows(x, sampled_states, generator)
        else:
            sampled_index = _to_device(sampled_rows, torch.long, device)
            greedy_index = _to_device(greedy_rows, torch.long, device)
            tokens = torch.empty(batch, dtype=torch.long, device=device)
            tokens.index_copy_(0, greedy_index, _row_argmax(x.index_select(0, greedy_index)))
            tokens.index_copy_(
                0,
                sampled_index,
                _sample_rows(x.index_select(0, sampled_index), sampled_states, generator),
            )

    # Everything the host needs goes in one float64 tensor (token ids are exact
    # in float64), read with a single copy: one device synchronisation per step.
    parts = [tokens.to(torch.float64)]
    num_top = 0
    if logprob_rows:
        if len(logprob_rows) == batch:
            logprobs, chosen_ids = x.log_softmax(dim=-1), tokens  # (B, V), (B,)
        else:
            lp_index = _to_device(logprob_rows, torch.long, device)
            logprobs = x.index_select(0, lp_index).log_softmax(dim=-1)  # (m, V)
            chosen_ids = tokens.index_select(0, lp_index)  # (m,)
        chosen = logprobs.gather(1, chosen_ids.unsqueeze(1))  # (m, 1)
        parts.append(chosen.squeeze(1).to(torch.float64))
        num_top = min(vocab, max(states[i].params.logprobs or 0 for i in logprob_rows))
        if num_top:
            top = logprobs.topk(num_top, dim=-1)  # (m, num_top) each, descending
            parts.append(top.indices.flatten().to(torch.float64))
            parts.append(top.values.flatten().to(torch.float64))
    top_ks = [min(vocab, states[i].params.logprobs or 0) for i in logprob_rows]
    return PendingSample(tokens, torch.cat(parts), logprob_rows, top_ks, num_top)
