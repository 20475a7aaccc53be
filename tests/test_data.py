"""moe.data: deterministic sampling, the token file format, the stdlib cache, prepare CLI, errors.

The stdlib corpus is built once per module with a tiny cap (200 KB, vocab 512) in a temp cache.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from moe.config import DataConfig
from moe.data import build_dataset
from moe.data.corpus import collect_files, iter_pieces, stdlib_files
from moe.data.dataset import TokenDataset, meta_path, open_tokens, read_meta, synthetic_tokens
from moe.data.prepare import main as prepare_main
from moe.data.prepare import stdlib_token_file
from moe.data.tokenizer import EOS, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 32


@pytest.fixture(scope="module")
def stdlib_cfg(tmp_path_factory) -> DataConfig:
    return DataConfig(source="stdlib", cache_dir=str(tmp_path_factory.mktemp("cache")),
                      tokenizer_vocab_size=512, max_corpus_bytes=200_000)


@pytest.fixture(scope="module")
def stdlib_ds(stdlib_cfg) -> TokenDataset:
    return build_dataset(stdlib_cfg, SEQ, seed=7, model_vocab_size=1024)


def same_sequences(ds: TokenDataset, step: int, n: int, split: str = "train") -> None:
    """One call over the global batch equals any cut of it into ranks / micro-batches."""
    whole_x, whole_y = ds.batch(step, range(n), split)
    for parts in ([range(0, 3), range(3, n)], [range(i, i + 1) for i in range(n)], [[5, 0], [7, 1, 2, 3, 4, 6]]):
        for part in parts:
            x, y = ds.batch(step, part, split)
            assert torch.equal(x, whole_x[list(part)]) and torch.equal(y, whole_y[list(part)])


# --- sampling -----------------------------------------------------------------------------------

def test_batch_shapes_and_shift(stdlib_ds):
    x, y = stdlib_ds.batch(0, range(4))
    assert x.shape == y.shape == (4, SEQ) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # targets really are the next tokens of the file, not a shifted copy of the inputs alone
    off = stdlib_ds.offsets(0, range(4))
    for row, o in zip(y, off):
        assert row.tolist() == stdlib_ds.tokens[o + 1:o + 1 + SEQ].tolist()
    assert 0 <= int(x.min()) and int(x.max()) < stdlib_ds.vocab_size


def test_deterministic_and_split_independent(stdlib_cfg, stdlib_ds):
    same_sequences(stdlib_ds, step=3, n=8)
    same_sequences(stdlib_ds, step=3, n=8, split="val")
    again = build_dataset(stdlib_cfg, SEQ, seed=7, model_vocab_size=1024)  # a "resumed" run
    assert torch.equal(again.batch(11, [2, 9])[0], stdlib_ds.batch(11, range(10))[0][[2, 9]])
    other_seed = build_dataset(stdlib_cfg, SEQ, seed=8, model_vocab_size=1024)
    assert not torch.equal(other_seed.batch(3, range(8))[0], stdlib_ds.batch(3, range(8))[0])
    assert not torch.equal(stdlib_ds.batch(4, range(8))[0], stdlib_ds.batch(3, range(8))[0])


def test_val_is_held_out_tail(stdlib_ds):
    lo = stdlib_ds.split_size("train")
    val_off = stdlib_ds.offsets(0, range(64), "val")
    train_off = stdlib_ds.offsets(0, range(64), "train")
    assert (val_off >= lo).all() and (val_off + SEQ + 1 <= len(stdlib_ds.tokens)).all()
    assert (train_off + SEQ + 1 <= lo).all()
    assert not torch.equal(stdlib_ds.batch(0, range(4), "val")[0], stdlib_ds.batch(0, range(4))[0])
    with pytest.raises(ValueError, match="split='test': unknown; allowed: train, val"):
        stdlib_ds.batch(0, range(2), "test")


def test_synthetic_deterministic_in_vocab_and_learnable():
    cfg = DataConfig(source="synthetic")
    a = build_dataset(cfg, SEQ, seed=1, model_vocab_size=300)
    b = build_dataset(cfg, SEQ, seed=1, model_vocab_size=300)
    assert a.vocab_size == 300
    x, y = a.batch(5, range(6))
    assert torch.equal(x, b.batch(5, range(6))[0]) and torch.equal(y, b.batch(5, range(6))[1])
    assert 0 <= int(x.min()) and int(x.max()) < 300
    same_sequences(a, step=2, n=8)
    assert not torch.equal(build_dataset(cfg, SEQ, seed=2, model_vocab_size=300).batch(5, range(6))[0], x)
    # Structure: each token has at most 4 successors, so there are at most 4*300 distinct bigrams
    # (+ one per seam where two of the 256 parallel walks are laid end to end), not ~50K as in noise.
    t = synthetic_tokens(300, seed=1, num_tokens=50_000).astype(np.int64)
    assert len(np.unique(t[:-1] * 300 + t[1:])) <= 4 * 300 + 256


# --- token file format and the stdlib cache --------------------------------------------------------

def test_memmap_round_trip(tmp_path):
    from moe.data.dataset import TokenFileMeta, write_meta
    for vocab, dtype in ((1000, np.uint16), (70_000, np.uint32)):
        ids = np.random.default_rng(0).integers(0, vocab, 5000).astype(dtype)
        path = str(tmp_path / f"t{vocab}.bin")
        ids.tofile(path)
        write_meta(path, TokenFileMeta(dtype=np.dtype(dtype).name, vocab_size=vocab, num_tokens=ids.size))
        tokens, meta = open_tokens(path)
        assert isinstance(tokens, np.memmap) and tokens.dtype == dtype and meta.vocab_size == vocab
        assert np.array_equal(tokens, ids)
        ds = build_dataset(DataConfig(source="file", path=path), SEQ, 0, vocab)
        x, _ = ds.batch(0, [3])
        o = int(ds.offsets(0, [3])[0])
        assert x[0].tolist() == ids[o:o + SEQ].astype(np.int64).tolist()
    with open(path, "ab") as f:
        f.write(b"\0\0")  # size no longer matches the sidecar
    with pytest.raises(ValueError, match="truncated or stale"):
        open_tokens(path)


def test_stdlib_cache_contents(stdlib_cfg, stdlib_ds):
    path = stdlib_token_file(stdlib_cfg)
    meta = read_meta(path)
    assert meta.dtype == "uint16" and meta.vocab_size == 512 == stdlib_ds.vocab_size
    assert meta.eos_id == 0 and meta.num_tokens == len(stdlib_ds.tokens) > 40_000
    assert 190_000 < meta.extra["text_bytes"] <= 200_000
    assert os.path.dirname(path).startswith(stdlib_cfg.cache_dir) and "v512" in path
    assert stdlib_ds.tokenizer == os.path.join(os.path.dirname(path), "tokenizer.json")


def _build(cfg: DataConfig) -> str:
    path = stdlib_token_file(cfg)
    return read_meta(path).extra["tokens_sha256"]


def test_concurrent_builds_agree(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), tokenizer_vocab_size=300, max_corpus_bytes=50_000)
    with multiprocessing.get_context("fork").Pool(3) as pool:
        hashes = pool.map(_build, [cfg] * 3)
    assert len(set(hashes)) == 1
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []  # no half-built folders left
    assert len(glob.glob(str(tmp_path / "stdlib-*" / "tokens.bin"))) == 1


def test_tokenizer_round_trips_stdlib_text(stdlib_ds):
    tok = load_tokenizer(stdlib_ds.tokenizer)
    # A file the tokenizer was trained on, and one far past the 200 KB cap it never saw.
    files = stdlib_files()
    for path in (files[0], files[len(files) // 2]):
        text = open(path, encoding="utf-8", errors="replace", newline="").read()
        assert tok.decode(tok.encode(text).ids) == text
    # The token file decodes back to the corpus text, documents separated by EOS.
    text = "".join(t for t, _ in iter_pieces(files, 200_000))
    ids = np.asarray(stdlib_ds.tokens).tolist()
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids[:100_000], skip_special_tokens=False).count(EOS) >= 2


# --- prepare CLI --------------------------------------------------------------------------------

def _write_texts(folder) -> None:
    os.makedirs(folder / "sub", exist_ok=True)
    (folder / "a.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 300)
    (folder / "sub" / "b.md").write_text("# Notes\n\nSphinx of black quartz, judge my vow!\n" * 300)
    (folder / "skip.bin").write_bytes(b"\0\1\2" * 100)  # binary: skipped
    (folder / ".hidden.txt").write_text("never read")


def test_prepare_cli_trains_tokenizer(tmp_path):
    _write_texts(tmp_path / "text")
    out = tmp_path / "out" / "tok.bin"
    r = subprocess.run([sys.executable, "-m", "moe.data.prepare", "--input", str(tmp_path / "text"),
                        "--output", str(out), "--vocab-size", "300"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "data.source=file" in r.stdout
    meta = json.load(open(meta_path(str(out))))
    assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16" and meta["extra"]["files"] == 3
    assert meta["tokenizer"] == "tok.tokenizer.json" and (tmp_path / "out" / "tok.tokenizer.json").exists()
    ds = build_dataset(DataConfig(source="file", path=str(out)), 16, 0, 300)
    tok = load_tokenizer(ds.tokenizer)
    decoded = tok.decode(np.asarray(ds.tokens).tolist(), skip_special_tokens=True)
    assert decoded == (tmp_path / "text" / "a.txt").read_text() + (tmp_path / "text" / "sub" / "b.md").read_text()
    assert "never read" not in decoded


def test_prepare_with_given_tokenizer(tmp_path, stdlib_ds):
    _write_texts(tmp_path)
    out = tmp_path / "given.bin"
    assert prepare_main(["--input", str(tmp_path / "a.txt"), "--output", str(out),
                         "--tokenizer", stdlib_ds.tokenizer]) == 0
    meta = read_meta(str(out))
    assert meta.vocab_size == 512 and os.path.isabs(meta.tokenizer)
    ids = np.fromfile(out, dtype=np.uint16).tolist()
    assert load_tokenizer(stdlib_ds.tokenizer).decode(ids, skip_special_tokens=True) == (tmp_path / "a.txt").read_text()
    assert collect_files([str(tmp_path)], [".md"]) == [str(tmp_path / "sub" / "b.md")]


# --- errors -------------------------------------------------------------------------------------

def test_errors_name_the_field(tmp_path, stdlib_cfg):
    with pytest.raises(ValueError, match=r"data.source='web': unknown; allowed: stdlib, synthetic, file"):
        build_dataset(DataConfig(source="web"), SEQ, 0, 512)
    with pytest.raises(ValueError, match=r"data.tokenizer_vocab_size=512: larger than model.vocab_size=256.*"
                                         r"set data.tokenizer_vocab_size<=256"):
        build_dataset(stdlib_cfg, SEQ, 0, 256)
    with pytest.raises(ValueError, match=r"data.tokenizer_vocab_size=100: a byte-level BPE needs at least 257"):
        build_dataset(dataclasses.replace(stdlib_cfg, tokenizer_vocab_size=100), SEQ, 0, 512)
    missing = str(tmp_path / "nope.bin")
    with pytest.raises(ValueError, match=r"data.path='.*nope.bin': no such token file; make one with "
                                         r"`python -m moe.data.prepare"):
        build_dataset(DataConfig(source="file", path=missing), SEQ, 0, 512)
    with pytest.raises(ValueError, match=r"data.path='': data.source=file needs a token file"):
        build_dataset(DataConfig(source="file"), SEQ, 0, 512)
    with pytest.raises(ValueError, match=r"data.val_fraction=0.0: must be between 0 and 1"):
        build_dataset(DataConfig(source="synthetic", val_fraction=0.0), SEQ, 0, 512)

    _write_texts(tmp_path)
    out = str(tmp_path / "small.bin")
    prepare_main(["--input", str(tmp_path / "a.txt"), "--output", out, "--vocab-size", "400"])
    vocab = read_meta(out).vocab_size  # < 400: this little text has few pairs worth merging
    with pytest.raises(ValueError, match=rf"its tokenizer has {vocab} tokens, more than model.vocab_size=260; "
                                         rf"raise model.vocab_size to >= {vocab}"):
        build_dataset(DataConfig(source="file", path=out), SEQ, 0, 260)
    n = read_meta(out).num_tokens
    with pytest.raises(ValueError, match=rf"data.path='.*small.bin': {n} tokens, fewer than train.seq_len\+1"):
        build_dataset(DataConfig(source="file", path=out), n, 0, 512)
    with pytest.raises(ValueError, match=r"the val split \(data.val_fraction=0.001\) has \d+ tokens, fewer than"):
        build_dataset(DataConfig(source="file", path=out, val_fraction=0.001), 64, 0, 512)
    os.remove(meta_path(out))
    with pytest.raises(ValueError, match=r"no .*small.bin.json sidecar"):
        build_dataset(DataConfig(source="file", path=out), SEQ, 0, 512)
