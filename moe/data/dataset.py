"""The token file format and `TokenDataset`: deterministic random windows over a token array.

Format: `NAME.bin` holds the raw token ids (little-endian, uint16 when the vocabulary is at most
65535, else uint32) and a sidecar `NAME.bin.json` describes them (`dtype`, `vocab_size`,
`num_tokens`, `tokenizer`, ...). The raw file is read through `np.memmap`, so every worker on a
node shares the page cache instead of holding its own copy. The sidecar is written last (by an
atomic rename), so its presence means the `.bin` beside it is complete.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

FORMAT = "moe-tokens"
FORMAT_VERSION = 1
SPLITS = {"train": 0, "val": 1}
"""Split names and the id each one mixes into the sampling seed."""


@dataclass
class TokenFileMeta:
    """The sidecar JSON of a token file."""
    dtype: str
    vocab_size: int
    num_tokens: int
    tokenizer: str | None = None
    """Path of the tokenizer.json, relative to the token file's folder when it lies under it."""
    eos_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Provenance: source, text/tokens sha256, byte counts, ..."""
    format: str = FORMAT
    version: int = FORMAT_VERSION


def token_dtype(vocab_size: int) -> np.dtype:
    """Dtype of the format for ids in [0, vocab_size): uint16 up to 65535 tokens, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def meta_path(token_path: str) -> str:
    """The sidecar of `token_path`: `tokens.bin` -> `tokens.bin.json`."""
    return token_path + ".json"


def write_meta(token_path: str, meta: TokenFileMeta) -> None:
    """Write the sidecar atomically (temp file + `os.replace`): readers never see half a file."""
    path = meta_path(token_path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(asdict(meta), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_meta(token_path: str) -> TokenFileMeta:
    """Read and check the sidecar of `token_path` (FileNotFoundError when it is missing)."""
    with open(meta_path(token_path)) as f:
        raw = json.load(f)
    if raw.get("format") != FORMAT or raw.get("version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path(token_path)}: not a {FORMAT} v{FORMAT_VERSION} sidecar")
    return TokenFileMeta(**raw)


def tokenizer_path(token_path: str, meta: TokenFileMeta) -> str | None:
    """Absolute path of the tokenizer recorded in `meta` (relative ones are under the file's folder)."""
    if not meta.tokenizer:
        return None
    return os.path.join(os.path.dirname(os.path.abspath(token_path)), meta.tokenizer)


def open_tokens(token_path: str) -> tuple[np.memmap, TokenFileMeta]:
    """Memory-map a token file after checking its size against the sidecar."""
    meta = read_meta(token_path)
    dtype = np.dtype(meta.dtype).newbyteorder("<")
    expected = meta.num_tokens * dtype.itemsize
    actual = os.path.getsize(token_path)
    if actual != expected:
        raise ValueError(f"{token_path}: {actual} bytes, but its sidecar promises {meta.num_tokens} "
                         f"{meta.dtype} tokens ({expected} bytes); the file is truncated or stale, prepare it again")
    if meta.num_tokens == 0:
        return np.zeros(0, dtype=dtype), meta  # np.memmap refuses empty files
    return np.memmap(token_path, dtype=dtype, mode="r"), meta


class TokenDataset:
    """Random `seq_len + 1` windows of a token array, a pure function of (seed, split, step, index).

    The last `val_fraction` of the tokens is the `val` split and the rest `train`; no window
    crosses the border. Sequence `i` of the global batch of step `s` starts at an offset drawn
    from `np.random.default_rng([seed, split_id, s, i])`, so any way of cutting the global batch
    into ranks and micro-batches gives the same sequences, and a resumed run continues exactly.
    """

    def __init__(self, tokens: np.ndarray, vocab_size: int, seq_len: int, seed: int,
                 val_fraction: float, name: str = "tokens", tokenizer: str | None = None):
        self.tokens = tokens
        self.vocab_size = int(vocab_size)
        self.seq_len = int(seq_len)
        # SeedSequence takes non-negative ints only; wrap negatives into uint64 instead of failing.
        self.seed = int(seed) % (1 << 64)
        self.name = name
        self.tokenizer = tokenizer
        """Absolute path of the tokenizer.json that decodes these ids, when there is one."""
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction={val_fraction}: must be between 0 and 1 (exclusive), e.g. 0.05")
        n = len(tokens)
        n_val = int(round(n * val_fraction))
        self._ranges = {"train": (0, n - n_val), "val": (n - n_val, n)}
        need = self.seq_len + 1
        if n < need:
            raise ValueError(f"{name}: {n} tokens, fewer than train.seq_len+1={need} needed for one sequence; "
                             f"use more text or a shorter train.seq_len")
        for split, (lo, hi) in self._ranges.items():
            if hi - lo < need:
                raise ValueError(f"{name}: the {split} split (data.val_fraction={val_fraction}) has {hi - lo} "
                                 f"tokens, fewer than train.seq_len+1={need}; use more text, a shorter "
                                 f"train.seq_len, or a val_fraction that leaves both splits long enough")

    def split_size(self, split: str = "train") -> int:
        """Tokens in `split`."""
        lo, hi = self._ranges[self._check_split(split)]
        return hi - lo

    def offsets(self, step: int, indices: Sequence[int] | range, split: str = "train") -> np.ndarray:
        """Start offsets (into the whole token array) of sequences `indices` of step `step`."""
        split_id = SPLITS[self._check_split(split)]
        lo, hi = self._ranges[split]
        starts = hi - lo - self.seq_len  # valid starts are lo .. hi - seq_len - 1
        if step < 0:
            raise ValueError(f"step={step}: must be >= 0")
        out = np.empty(len(indices), dtype=np.int64)
        for j, i in enumerate(indices):
            if i < 0:
                raise ValueError(f"sequence index {i}: must be >= 0")
            # A fresh generator per sequence is what makes sequence i independent of its neighbours
            # in the same call; ~10 us each, negligible next to a training step.
            rng = np.random.default_rng([self.seed, split_id, int(step), int(i)])
            out[j] = lo + rng.integers(0, starts)
        return out

    def batch(self, step: int, indices: Sequence[int] | range, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences `indices` of the global batch of `step`: (inputs [n, seq_len] int64,
        targets [n, seq_len] int64, targets = inputs shifted by one)."""
        offsets = self.offsets(step, indices, split)
        windows = np.asarray(self.tokens[offsets[:, None] + np.arange(self.seq_len + 1)], dtype=np.int64)
        windows = torch.from_numpy(windows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def _check_split(self, split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: unknown; allowed: {', '.join(SPLITS)}")
        return split

    def __repr__(self) -> str:
        return (f"TokenDataset({self.name}: {len(self.tokens)} tokens, vocab {self.vocab_size}, "
                f"seq_len {self.seq_len}, train {self.split_size('train')}, val {self.split_size('val')})")


SYNTHETIC_SUCCESSOR_PROBS = (0.6, 0.25, 0.1, 0.05)
"""Each token is followed by one of 4 fixed successors with these probabilities: an ideal model
reaches about 1.03 nats/token (a bit less where successors collide), from ln(vocab) at init."""


def synthetic_tokens(vocab_size: int, seed: int, num_tokens: int = 1 << 20, chains: int = 256) -> np.ndarray:
    """Tokens of a fixed random first-order Markov chain: learnable structure, no files.

    The chain (each token's successors) and the walk are both seeded by `seed`. `chains` walks
    run side by side so generation is a loop over `num_tokens / chains` vectorised steps (~20 ms
    for 1M tokens), then they are laid end to end.
    """
    if vocab_size < 2:
        raise ValueError(f"model.vocab_size={vocab_size}: synthetic data needs at least 2 tokens")
    probs = np.asarray(SYNTHETIC_SUCCESSOR_PROBS)
    # The tag keeps this stream independent of the sampling generators seeded with [seed, ...].
    rng = np.random.default_rng([int(seed) % (1 << 64), 0x5EED])
    successors = rng.integers(0, vocab_size, size=(vocab_size, len(probs)))
    steps = -(-num_tokens // chains)
    choices = rng.choice(len(probs), size=(steps, chains), p=probs)
    state = rng.integers(0, vocab_size, size=chains)
    out = np.empty((steps, chains), dtype=np.int64)
    for t in range(steps):
        out[t] = state
        state = successors[state, choices[t]]
    return out.T.reshape(-1)[:num_tokens].astype(token_dtype(vocab_size))
