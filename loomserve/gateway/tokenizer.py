"""Loading the model's tokenizer, its end-of-sequence ids and its chat template.

Two kinds of model are supported: a GGUF file, whose vocabulary, merges and chat
template live in the file's metadata, and a Hugging Face model directory with the
tokenizer files inside.

Building a tokenizer from GGUF metadata takes transformers several seconds, which
every gateway start would pay. We convert once, keep the result under the cache
directory in Hugging Face format, and load that afterwards (a fraction of a second).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import transformers
from gguf import GGUFValueType
from gguf.constants import Keys
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loomserve.shared.model_files import ModelFileError, cache_dir

log = logging.getLogger(__name__)

_GGUF_MAGIC = b"GGUF"

# Bump when the layout of a cached tokenizer directory changes, so old entries are
# not reused.
_CACHE_FORMAT = "1"

# GGUF puts all metadata (vocabulary and merges included) before the tensor data,
# and even 256k-token vocabularies stay well under this size; hashing only the
# beginning keeps start-up fast for multi-gigabyte files while still telling apart
# files whose tokenizers differ.
_KEY_PREFIX_BYTES = 64 << 20

# End-of-generation ids a GGUF file may declare besides its EOS: llama.cpp stops on
# "end of turn" (e.g. Llama 3's <|eot_id|>) and "end of message" tokens too, and
# transformers' GGUF conversion keeps only the EOS.
_GGUF_STOP_KEYS = (Keys.Tokenizer.EOS_ID, Keys.Tokenizer.EOT_ID, Keys.Tokenizer.EOM_ID)

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_INT_TYPES = frozenset(_SCALAR_FORMATS) - {
    GGUFValueType.FLOAT32, GGUFValueType.FLOAT64, GGUFValueType.BOOL
}


def load_tokenizer(model_path: Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a GGUF file or of a Hugging Face model directory."""
    if model_path.is_dir():
        return _load_hf_tokenizer(model_path)
    if _is_gguf(model_path):
        return _load_gguf_tokenizer(model_path)
    raise ModelFileError(
        f"{model_path} is neither a GGUF file nor a Hugging Face model directory"
    )


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, model_path: Path) -> list[int]:
    """All token ids that end generation, the tokenizer's EOS first, without repeats.

    Besides the tokenizer's EOS this takes the ``eos_token_id`` of
    ``generation_config.json`` in a Hugging Face directory (chat models often list
    their end-of-turn token there) and the EOS/EOT/EOM ids of a GGUF file.
    """
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if model_path.is_dir():
        ids.extend(_generation_config_eos(model_path / "generation_config.json"))
    elif _is_gguf(model_path):
        ids.extend(_gguf_int_fields(model_path, _GGUF_STOP_KEYS).values())
    return list(dict.fromkeys(ids))


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    chat_template: str | None = None,
    **template_kwargs: Any,
) -> list[int]:
    """Render ``messages`` with the chat template and return the prompt's token ids.

    ``template_kwargs`` reach the Jinja template as variables (e.g.
    ``enable_thinking``). Raises ValueError if the tokenizer has no chat template
    and none is given.
    """
    if chat_template is None and tokenizer.chat_template is None:
        raise ValueError(
            "this model has no chat template; use the completions endpoint or pass a "
            "chat template explicitly"
        )
    rendered = tokenizer.apply_chat_template(
        [dict(message) for message in messages],
        tools=None if tools is None else [dict(tool) for tool in tools],
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=False,
        **template_kwargs,
    )
    return _as_token_ids(rendered)


def _as_token_ids(rendered: object) -> list[int]:
    # transformers 5 returns a BatchEncoding by default and a plain list with
    # return_dict=False, older versions a list or a batch of one; accept every shape.
    if isinstance(rendered, Mapping):
        rendered = rendered["input_ids"]
    if isinstance(rendered, Sequence) and rendered and isinstance(rendered[0], Sequence):
        rendered = rendered[0]
    if not isinstance(rendered, Sequence) or isinstance(rendered, str):
        raise TypeError(f"apply_chat_template returned {type(rendered).__name__}, not token ids")
    return [int(token_id) for token_id in rendered]


def _load_hf_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise ModelFileError(
            f"cannot load a tokenizer from {model_dir}: {exc}. A Hugging Face model "
            f"directory needs its tokenizer files (tokenizer.json or tokenizer.model "
            f"and tokenizer_config.json)."
        ) from exc


def _load_gguf_tokenizer(gguf_path: Path) -> PreTrainedTokenizerBase:
    target = _gguf_cache_entry(gguf_path)
    # Entries appear by an atomic rename, so an existing directory is complete and
    # can be read without the lock.
    cached = _load_cached(target)
    if cached is not None:
        return cached
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        # Another process may have finished the conversion while we waited.
        cached = _load_cached(target)
        if cached is not None:
            return cached
        _convert_gguf(gguf_path, target)
    return AutoTokenizer.from_pretrained(str(target))


def _gguf_cache_entry(gguf_path: Path) -> Path:
    digest = hashlib.sha256()
    digest.update(f"{_CACHE_FORMAT}\0{transformers.__version__}\0".encode())
    digest.update(str(gguf_path.stat().st_size).encode() + b"\0")
    with gguf_path.open("rb") as f:
        remaining = _KEY_PREFIX_BYTES
        while remaining > 0 and (chunk := f.read(min(remaining, 1 << 20))):
            digest.update(chunk)
            remaining -= len(chunk)
    # The transformers version is in the key because a newer conversion may fix
    # tokenizer bugs that an old cached copy would keep.
    return cache_dir() / "tokenizers" / f"{gguf_path.stem}-{digest.hexdigest()[:24]}"


def _load_cached(target: Path) -> PreTrainedTokenizerBase | None:
    if not target.is_dir():
        return None
    try:
        return AutoTokenizer.from_pretrained(str(target))
    except Exception as exc:  # any failure means a damaged entry: rebuild it, don't crash
        log.warning("cached tokenizer %s is unreadable (%s); converting again", target, exc)
        _discard(target)
        return None


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    log.info("building the tokenizer from %s once; caching it at %s", gguf_path, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    # mkdtemp makes the directory private; the entry should be as readable as the
    # rest of the cache.
    staging.chmod(0o755)
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelFileError(f"cannot build a tokenizer from {gguf_path}: {exc}") from exc
        tokenizer.save_pretrained(str(staging))
        try:
            staging.rename(target)
        except OSError:
            # Only a process that skipped the lock (e.g. on a filesystem without
            # flock) can get here first; its entry is as good as ours.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _discard(target: Path) -> None:
    # Rename first so that no reader ever sees a half-deleted entry under the real name.
    trash = target.with_name(f".{target.name}.trash-{os.getpid()}")
    try:
        target.rename(trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(len(_GGUF_MAGIC)) == _GGUF_MAGIC


def _generation_config_eos(path: Path) -> list[int]:
    if not path.is_file():
        return []
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value]
    return []


def _gguf_int_fields(path: Path, keys: Sequence[str]) -> dict[str, int]:
    """Integer metadata values of a GGUF file, for those of ``keys`` that are present.

    gguf.GGUFReader would do, but it materialises every vocabulary entry and takes
    seconds; this walks the metadata once, skipping arrays without decoding them.
    """
    wanted = set(keys)
    found: dict[str, int] = {}
    with path.open("rb") as f:
        if f.read(len(_GGUF_MAGIC)) != _GGUF_MAGIC:
            raise ModelFileError(f"{path} is not a GGUF file")
        _version, _n_tensors, n_kv = _unpack(f, "<IQQ")
        for _ in range(n_kv):
            key = f.read(_unpack(f, "<Q")[0]).decode("utf-8", errors="replace")
            value_type = GGUFValueType(_unpack(f, "<I")[0])
            if key in wanted and value_type in _INT_TYPES:
                found[key] = int(_unpack(f, _SCALAR_FORMATS[value_type])[0])
            else:
                _skip_value(f, value_type)
            if len(found) == len(wanted):
                break
    return {key: found[key] for key in keys if key in found}


def _skip_value(f: IO[bytes], value_type: GGUFValueType) -> None:
    if value_type == GGUFValueType.STRING:
        f.seek(_unpack(f, "<Q")[0], os.SEEK_CUR)
    elif value_type == GGUFValueType.ARRAY:
        item_type = GGUFValueType(_unpack(f, "<I")[0])
        count = _unpack(f, "<Q")[0]
        if item_type in _SCALAR_FORMATS:
            f.seek(count * struct.calcsize(_SCALAR_FORMATS[item_type]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(f, item_type)
    else:
        f.seek(struct.calcsize(_SCALAR_FORMATS[value_type]), os.SEEK_CUR)


def _unpack(f: IO[bytes], fmt: str) -> tuple[Any, ...]:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ModelFileError(f"{getattr(f, 'name', 'GGUF file')} ends inside its metadata")
    return struct.unpack(fmt, data)
