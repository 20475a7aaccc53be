"""Training data: `build_dataset(cfg, seq_len, seed, model_vocab_size)` is the trainer's one entry.

Sources (`data.source`):
- `stdlib`: Python's standard-library sources, BPE-tokenized once and cached under
  `data.cache_dir` (no download; the same corpus on every machine with the same Python);
- `synthetic`: a seeded random Markov chain over the model vocabulary (no files at all);
- `file`: a token file made by `python -m moe.data.prepare` from your own text.
"""
from __future__ import annotations

import os

from moe.config import DataConfig
from moe.data.dataset import TokenDataset, open_tokens, synthetic_tokens, tokenizer_path
from moe.data.prepare import stdlib_token_file
from moe.data.tokenizer import MIN_VOCAB

SOURCES = ("stdlib", "synthetic", "file")

__all__ = ["SOURCES", "TokenDataset", "build_dataset"]


def build_dataset(cfg: DataConfig, seq_len: int, seed: int, model_vocab_size: int) -> TokenDataset:
    """The dataset `cfg` describes, for `seq_len`-token sequences sampled with `seed`.

    Raises ValueError naming the offending `data.*` field when the source is unknown, the token
    file is missing or too short, or the tokenizer's vocabulary exceeds `model_vocab_size`.
    """
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"data.val_fraction={cfg.val_fraction}: must be between 0 and 1 (exclusive), e.g. 0.05")
    if cfg.source == "synthetic":
        tokens = synthetic_tokens(model_vocab_size, seed, _synthetic_length(seq_len, cfg.val_fraction))
        return TokenDataset(tokens, model_vocab_size, seq_len, seed, cfg.val_fraction, name="synthetic")
    if cfg.source == "stdlib":
        if cfg.tokenizer_vocab_size > model_vocab_size:
            raise ValueError(f"data.tokenizer_vocab_size={cfg.tokenizer_vocab_size}: larger than "
                             f"model.vocab_size={model_vocab_size}, so token ids would overflow the embedding; "
                             f"set data.tokenizer_vocab_size<={model_vocab_size} or raise model.vocab_size")
        if cfg.tokenizer_vocab_size < MIN_VOCAB:
            raise ValueError(f"data.tokenizer_vocab_size={cfg.tokenizer_vocab_size}: a byte-level BPE needs "
                             f"at least {MIN_VOCAB} tokens (256 bytes + end-of-text); raise it")
        if cfg.max_corpus_bytes < 1:
            raise ValueError(f"data.max_corpus_bytes={cfg.max_corpus_bytes}: must be >= 1 (8000000 is the default)")
        name = f"stdlib corpus (data.max_corpus_bytes={cfg.max_corpus_bytes})"
        return _from_file(stdlib_token_file(cfg), name, cfg, seq_len, seed, model_vocab_size)
    if cfg.source == "file":
        if not cfg.path:
            raise ValueError("data.path='': data.source=file needs a token file; make one with "
                             "`python -m moe.data.prepare --input YOUR_TEXT --output tokens.bin`")
        path = os.path.expanduser(cfg.path)
        if not os.path.isfile(path):
            raise ValueError(f"data.path={cfg.path!r}: no such token file; make one with "
                             f"`python -m moe.data.prepare --input YOUR_TEXT --output {cfg.path}`")
        return _from_file(path, f"data.path={cfg.path!r}", cfg, seq_len, seed, model_vocab_size)
    raise ValueError(f"data.source={cfg.source!r}: unknown; allowed: {', '.join(SOURCES)}")


def _from_file(path: str, name: str, cfg: DataConfig, seq_len: int, seed: int, model_vocab_size: int) -> TokenDataset:
    """Memory-map a token file and check it against the model; `name` (the config knob that chose
    the file) starts the error messages about its length."""
    try:
        tokens, meta = open_tokens(path)
    except FileNotFoundError:
        raise ValueError(f"data.path={path!r}: no {path}.json sidecar beside it, so it is not a finished "
                         f"token file; make it with `python -m moe.data.prepare`") from None
    if meta.vocab_size > model_vocab_size:
        raise ValueError(f"data.path={path!r}: its tokenizer has {meta.vocab_size} tokens, more than "
                         f"model.vocab_size={model_vocab_size}; raise model.vocab_size to >= {meta.vocab_size} "
                         f"or prepare the file with --vocab-size <= {model_vocab_size}")
    return TokenDataset(tokens, meta.vocab_size, seq_len, seed, cfg.val_fraction, name=name,
                        tokenizer=tokenizer_path(path, meta))


def _synthetic_length(seq_len: int, val_fraction: float) -> int:
    """1M tokens, or more when needed so both splits still hold many windows of `seq_len + 1`."""
    smallest = max(min(val_fraction, 1 - val_fraction), 1e-3)
    return max(1 << 20, int(64 * (seq_len + 1) / smallest))
