"""A tiny, real llama-architecture GGUF model, generated at test time.

The weights are random (fixed seed), so the text it writes is nonsense, but llama.cpp loads
it, tokenizes with it and decodes through the same code paths as a real model, in well under
a millisecond per token. Use :func:`tiny_model_path` from tests; :func:`make_tiny_model` writes
a fresh copy anywhere.
"""

from __future__ import annotations

import functools
import hashlib
import os
import string
import tempfile
from importlib import metadata
from pathlib import Path

import gguf
import numpy as np

__all__ = [
    "BOS",
    "CHAT_TEMPLATE",
    "EOS",
    "IM_END",
    "IM_START",
    "N_BLOCKS",
    "N_CTX_TRAIN",
    "N_EMBD",
    "UNK",
    "make_tiny_model",
    "tiny_model_path",
    "vocabulary",
]

N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2  # fewer KV heads than query heads: exercises grouped-query attention
HEAD_DIM = N_EMBD // N_HEAD
N_FF = 128
N_BLOCKS = 2  # two, so that anything per-layer (KV cache, state snapshots) is not a special case
N_CTX_TRAIN = 2048

UNK, BOS, EOS = 0, 1, 2
IM_START, IM_END = 259, 260  # right after the 256 byte tokens, which sit at 3..258

# ChatML. "<|im_end|>" is in the vocabulary as a control token, and llama.cpp recognizes that
# text as an end-of-turn token, so chat generation can stop on it as with a real model.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_NORMAL, _UNKNOWN, _CONTROL, _BYTE = (
    gguf.TokenType.NORMAL,
    gguf.TokenType.UNKNOWN,
    gguf.TokenType.CONTROL,
    gguf.TokenType.BYTE,
)

# SentencePiece builds words by merging adjacent pieces, and only into pieces that are in the
# vocabulary, so every multi-character piece needs a chain of smaller ones leading to it
# ("▁h" + "e" -> "▁he", "▁he" + "l" -> "▁hel", ...). These make "hello world" and "the"
# tokenize into a few whole-word pieces; anything else falls back to letters or byte tokens.
_WORDS = ("▁hello", "▁world", "▁the")


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types, in id order."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [_UNKNOWN, _CONTROL, _CONTROL]
    # Byte fallback: any UTF-8 the pieces below do not cover becomes these, as in Llama 2.
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [_BYTE] * 256
    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [_CONTROL, _CONTROL]
    scores = [0.0] * len(tokens)

    pieces = ["▁", *string.ascii_lowercase, *string.digits, *".,!?'-:;()"]
    pieces += [f"▁{c}" for c in string.ascii_lowercase]
    for word in _WORDS:
        pieces += [word[:n] for n in range(3, len(word) + 1)]
    pieces = list(dict.fromkeys(pieces))  # drop repeats, keep order
    tokens += pieces
    types += [_NORMAL] * len(pieces)
    # The merge with the highest score wins: longer pieces score higher, so whole words form.
    scores += [float(len(p)) for p in pieces]
    return tokens, scores, [int(t) for t in types]


def make_tiny_model(path: Path) -> Path:
    """Write the tiny model to ``path`` (overwriting it) and return ``path``."""
    path = Path(path)
    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)
    rng = np.random.default_rng(0)

    def weight(*shape: int) -> np.ndarray:
        # Small weights keep activations and logits finite and far from overflow.
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    writer = gguf.GGUFWriter(path, "llama")  # also writes general.architecture = "llama"
    writer.add_name("seqlease tiny test model")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_BLOCKS)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)

    writer.add_tokenizer_model("llama")  # SentencePiece
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    # numpy shapes are ggml's ne reversed: a matrix with ne = [n_in, n_out] is (n_out, n_in).
    n_kv = N_HEAD_KV * HEAD_DIM
    writer.add_tensor("token_embd.weight", weight(n_vocab, N_EMBD))
    for i in range(N_BLOCKS):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", ones(N_EMBD))
        writer.add_tensor(f"{blk}.attn_q.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"{blk}.attn_k.weight", weight(n_kv, N_EMBD))
        writer.add_tensor(f"{blk}.attn_v.weight", weight(n_kv, N_EMBD))
        writer.add_tensor(f"{blk}.attn_output.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_norm.weight", ones(N_EMBD))
        writer.add_tensor(f"{blk}.ffn_gate.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_up.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_down.weight", weight(N_EMBD, N_FF))
    writer.add_tensor("output_norm.weight", ones(N_EMBD))
    writer.add_tensor("output.weight", weight(n_vocab, N_EMBD))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _cache_key() -> str:
    # The file depends on this generator and on how gguf and numpy write and draw numbers:
    # a change to any of them gets a new file instead of a stale one.
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for package in ("gguf", "numpy"):
        digest.update(f"{package}={metadata.version(package)}".encode())
    return digest.hexdigest()[:16]


@functools.cache
def tiny_model_path() -> Path:
    """The tiny model, generated once and shared by every test process on the machine.

    The file lives in the system temp directory under a name that changes with the generator.
    It is written to a private temp file and renamed into place, which is atomic: processes
    racing to create it (pytest-xdist workers) each write their own copy, and a reader only
    ever sees a complete file.
    """
    target = Path(tempfile.gettempdir()) / f"seqlease-tiny-{_cache_key()}.gguf"
    if not target.is_file():
        fd, tmp = tempfile.mkstemp(prefix=target.stem + "-", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            make_tiny_model(Path(tmp))
            os.chmod(tmp, 0o644)  # mkstemp makes it private; other users may share the file
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return target
