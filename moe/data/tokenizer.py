"""Byte-level BPE (HF `tokenizers`): training, loading, and streaming text into a token file.

Byte-level means every byte has a token, so any text encodes without unknowns and decodes back
exactly. Training is deterministic (same text and vocabulary give the same merges, whatever the
thread count), which is what lets every machine rebuild the same cached tokenizer on its own.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import BinaryIO

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moe.data.corpus import Piece
from moe.data.dataset import token_dtype

EOS = "<|endoftext|>"
"""Special token written after each document; it gets id 0 in tokenizers trained here."""
MIN_VOCAB = 257
"""256 byte tokens + EOS: the smallest vocabulary a byte-level BPE can have."""


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (EOS included) on `texts`."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least {MIN_VOCAB} tokens "
                         f"(256 bytes + {EOS})")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would be invented text and break exact round trips.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        # All 256 bytes up front, so text unseen in training still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    """Load a `tokenizer.json` (one made here, or any HF tokenizer file)."""
    return Tokenizer.from_file(path)


def eos_id(tok: Tokenizer) -> int | None:
    """Id of the end-of-document token, or None when the tokenizer has none (then documents are
    simply concatenated)."""
    return tok.token_to_id(EOS)


def encode_to_stream(tok: Tokenizer, pieces: Iterable[Piece], out: BinaryIO,
                     batch_bytes: int = 4 << 20) -> dict[str, int | str]:
    """Encode `pieces` and write raw little-endian token ids to `out`, EOS after each document.

    Pieces are batched (`encode_batch` runs on all cores) and written as they come, so memory
    stays bounded by `batch_bytes` of text. Returns `num_tokens`, `text_bytes`, and the sha256 of
    the text and of the tokens written (fingerprints to compare corpora across machines).
    """
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab).newbyteorder("<")
    eos = eos_id(tok)
    text_hash, token_hash = hashlib.sha256(), hashlib.sha256()
    stats = {"num_tokens": 0, "text_bytes": 0}
    batch: list[Piece] = []
    size = 0

    def flush() -> None:
        encodings = tok.encode_batch([text for text, _ in batch])
        ids: list[int] = []
        for (_, ends), enc in zip(batch, encodings):
            ids += enc.ids
            if ends and eos is not None:
                ids.append(eos)
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= vocab):
            raise ValueError(f"tokenizer produced id {int(arr.max())} outside its vocabulary of {vocab}")
        data = arr.astype(dtype).tobytes()
        out.write(data)
        token_hash.update(data)
        stats["num_tokens"] += arr.size

    for text, ends in pieces:
        raw = text.encode("utf-8")
        text_hash.update(raw)
        stats["text_bytes"] += len(raw)
        batch.append((text, ends))
        size += len(raw)
        if size >= batch_bytes:
            flush()
            batch, size = [], 0
    if batch:
        flush()
    return {**stats, "text_sha256": text_hash.hexdigest(), "tokens_sha256": token_hash.hexdigest()}
