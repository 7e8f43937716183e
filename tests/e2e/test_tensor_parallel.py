"""Tensor parallelism through the whole stack: HTTP -> gateway -> scheduler -> worker group
of N rank processes (gloo on the CPU).

* greedy outputs of a small random-weight Llama (8 query heads, 2 KV heads; the
  default model's tokenizer) at TP = 2 and TP = 4 equal TP = 1, and the default
  model (9 heads, 3 KV heads) at TP = 3 equals the shared TP = 1 stack. The
  prompts are sent at once, so they share batches. Float summation order
  differs between group sizes, so exact token equality is the rule and a
  difference is accepted only at a near-tie (``tests.e2e.reference``);
* ranks started one by one with ``--ranks`` and a rendezvous address, as on
  several hosts, form one group behind a standalone scheduler and gateway;
* a rank killed with SIGKILL mid-generation: the stream ends with an error
  within seconds, health turns unhealthy, no process of the old group is left,
  and ``serve`` starts the group again.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from loomserve.gateway.tokenizer import load_tokenizer
from tests.e2e.reference import Greedy, assert_greedy_close
from tests.stack import ServeStack, descendants, kill_mid_stream, pid_alive
from tests.worker.loader.test_loaders import widen_weights

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5,",
    "The most important rule of writing clean code is",
    "Hi",
]
MAX_TOKENS = 16
EXTRA = {"return_token_ids": True, "return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Path:
    """A random 2-layer Llama with 8 query heads and 2 KV heads, saved as safetensors
    beside the default model's tokenizer (whose vocabulary it shares)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_tokenizer(default_model_path)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = widen_weights(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _greedy(base_url: str, prompt: str, max_tokens: int = MAX_TOKENS) -> Greedy:
    with openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        model = client.models.list().data[0].id
        resp = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                         logprobs=5, extra_body=EXTRA)
    choice = resp.choices[0]
    assert choice.logprobs is not None and choice.logprobs.top_logprobs is not None
    tops = [{int(k.split(":", 1)[1]): v for k, v in top.items()} for top in choice.logprobs.top_logprobs]
    return Greedy((choice.model_extra or {})["token_ids"], tops)


def _all_greedy(base_url: str) -> list[Greedy]:
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(lambda p: _greedy(base_url, p), PROMPTS))


def _serve(log: Path, *args: str) -> ServeStack:
    stack = ServeStack("--response-cache", "false", "--max-num-batched-tokens", "512", *args, log_path=log)
    stack.wait_ready()
    return stack


def test_random_llama_tp2_and_tp4_equal_tp1(tiny_model: Path, tmp_path: Path) -> None:
    outputs: dict[int, list[Greedy]] = {}
    for tp in (1, 2, 4):
        stack = _serve(tmp_path / f"tp{tp}.log", "--model", str(tiny_model), "--tp", str(tp), "--kv-cache-gb", "0.05")
        try:
            ranks = [p for p in stack.child_pids if b"--ranks" in Path(f"/proc/{p}/cmdline").read_bytes()]
            assert len(ranks) == (tp if tp > 1 else 0), "one process per rank"
            outputs[tp] = _all_greedy(stack.base_url)
        finally:
            assert stack.stop() == 0, stack.log_tail()
    for tp in (2, 4):
        for i, prompt in enumerate(PROMPTS):
            assert len(outputs[tp][i].token_ids) == MAX_TOKENS
            assert_greedy_close(outputs[1][i], outputs[tp][i], f"TP={tp} prompt {prompt!r}")


def test_default_model_tp3_equals_tp1(stack: ServeStack, tmp_path: Path) -> None:
    single = _all_greedy(stack.base_url)
    stack3 = _serve(tmp_path / "tp3.log", "--tp", "3", "--kv-cache-gb", "0.2")
    try:
        _, health = stack3.get("/health")
        assert health["kv_blocks"] > 0
        group = _all_greedy(stack3.base_url)
    finally:
        assert stack3.stop() == 0, stack3.log_tail()
    for i, prompt in enumerate(PROMPTS):
        assert_greedy_close(single[i], group[i], f"TP=3 prompt {prompt!r}")


@pytest.fixture
def tp2(tiny_model: Path, tmp_path: Path) -> Iterator[ServeStack]:
    stack = _serve(tmp_path / "serve.log", "--model", str(tiny_model), "--tp", "2", "--kv-cache-gb", "0.05")
    try:
        yield stack
    finally:
        assert stack.stop() == 0, stack.log_tail()


def _rank_pids(stack: ServeStack) -> dict[int, int]:
    ranks = {}
    for pid in descendants(stack.proc.pid):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"--ranks" in argv:
            ranks[int(argv[argv.index(b"--ranks") + 1])] = pid
    return ranks


def test_rank_killed_mid_generation_fails_fast_and_the_group_comes_back(tp2: ServeStack) -> None:
    old = set(tp2.child_pids)
    ranks = _rank_pids(tp2)
    assert sorted(ranks) == [0, 1]
    lines, ended_after = kill_mid_stream(tp2.base_url, ranks[1], max_tokens=1500)
    assert lines[-1] == "[DONE]"
    error = json.loads(lines[-2])["error"]
    assert "worker group is down" in error["message"], error
    assert ended_after < 5, f"the stream took {ended_after:.1f} s to fail"
    assert "worker group is down" in tp2.wait_unhealthy()["reason"]
    # The whole old group goes (launcher and rank 0 too); serve starts a new one.
    deadline = time.monotonic() + 15
    while any(pid_alive(p) for p in ranks.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in ranks.values()), "a rank of the dead group is still running"
    tp2.wait_ready()
    new_ranks = _rank_pids(tp2)
    assert sorted(new_ranks) == [0, 1] and not set(new_ranks.values()) & old
    assert len(_greedy(tp2.base_url, "Hi", max_tokens=4).token_ids) == 4


def test_ranks_started_one_by_one_as_on_several_hosts(tiny_model: Path, tmp_path: Path) -> None:
    """Scheduler, gateway and each rank as separate commands, the ranks meeting at one
    rendezvous address (``--ranks`` and ``--dist-init-address``), as on two hosts."""
    from tests.stack import free_port

    gateway_address = f"tcp://127.0.0.1:{free_port()}"
    worker_address = f"tcp://127.0.0.1:{free_port()}"
    rendezvous = f"127.0.0.1:{free_port()}"
    port = free_port()
    commands = {
        "scheduler": ["scheduler", "--tp", "2", "--gateway-address", gateway_address,
                      "--worker-address", worker_address],
        **{f"rank{r}": ["worker", "--tp", "2", "--ranks", str(r), "--dist-init-address", rendezvous,
                        "--scheduler-address", worker_address, "--model", str(tiny_model), "--kv-cache-gb", "0.05"]
           for r in (0, 1)},
        "gateway": ["gateway", "--scheduler-address", gateway_address, "--model", str(tiny_model),
                    "--port", str(port), "--response-cache", "false"],
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "loomserve.cli", *argv], stdout=(tmp_path / name).open("wb"),
                                    stderr=subprocess.STDOUT)
             for name, argv in commands.items()}
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        else:
            pytest.fail("the group did not become ready: " + (tmp_path / "rank1").read_text()[-2000:])
        assert len(_greedy(base, "Hi", max_tokens=6).token_ids) == 6
        assert "worker group ready: 2 rank(s)" in (tmp_path / "scheduler").read_text()
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        codes = {name: proc.wait(30) for name, proc in procs.items()}
    assert codes == dict.fromkeys(procs, 0), {name: (tmp_path / name).read_text()[-1500:] for name in procs}
