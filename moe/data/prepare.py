"""Make token files: from the user's text (the CLI below) or, cached, from the Python stdlib.

    python -m moe.data.prepare --input FILES_OR_DIRS... --output out.bin [--vocab-size N] [--tokenizer tokenizer.json]

trains a byte-level BPE on the text (or uses the given tokenizer.json), writes `out.bin` +
`out.bin.json` (+ `out.tokenizer.json` when it trained one); train on it with
`data.source=file data.path=out.bin`.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from moe.config import DataConfig
from moe.data.corpus import Piece, collect_files, iter_pieces, stdlib_files, stdlib_root
from moe.data.dataset import TokenFileMeta, meta_path, read_meta, token_dtype, write_meta
from moe.data.tokenizer import encode_to_stream, eos_id, load_tokenizer, train_bpe

STDLIB_CACHE_VERSION = 1
"""Bump when the stdlib corpus or its tokenization changes, so old caches are not reused."""


def prepare_token_file(pieces: Callable[[], Iterable[Piece]], output: str, vocab_size: int = 4096,
                       tokenizer: str | None = None, tokenizer_out: str | None = None,
                       extra: dict[str, Any] | None = None) -> TokenFileMeta:
    """Tokenize the corpus `pieces()` into the token file `output` (+ its sidecar).

    `pieces` is called once to train a BPE of `vocab_size` (saved to `tokenizer_out`, by default
    `output` with `.tokenizer.json` for `.bin`) unless `tokenizer` names a tokenizer.json to use,
    and once more to encode. Every file is written under a temporary name and renamed into place.
    """
    output = os.path.abspath(os.path.expanduser(output))
    out_dir = os.path.dirname(output)
    os.makedirs(out_dir, exist_ok=True)
    if tokenizer is None:
        tok = train_bpe((text for text, _ in pieces()), vocab_size)
        tok_path = tokenizer_out or os.path.splitext(output)[0] + ".tokenizer.json"
        tmp = f"{tok_path}.tmp-{os.getpid()}"
        tok.save(tmp)
        os.replace(tmp, tok_path)
    else:
        tok_path = os.path.abspath(os.path.expanduser(tokenizer))
        tok = load_tokenizer(tok_path)
    # Drop a stale sidecar first: until the new one lands, the new .bin must not look complete.
    with contextlib.suppress(FileNotFoundError):
        os.remove(meta_path(output))
    tmp = f"{output}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        stats = encode_to_stream(tok, pieces(), f)
    os.replace(tmp, output)
    rel = os.path.relpath(tok_path, out_dir)
    vocab = tok.get_vocab_size()
    meta = TokenFileMeta(
        dtype=token_dtype(vocab).name, vocab_size=vocab, num_tokens=int(stats.pop("num_tokens")),
        # Relative when beside the tokens, so the folder can be moved or shared as a whole.
        tokenizer=tok_path if rel.startswith("..") else rel,
        eos_id=eos_id(tok), extra={**(extra or {}), **stats},
    )
    write_meta(output, meta)
    return meta


def stdlib_cache_folder(cfg: DataConfig) -> str:
    """Cache folder of the stdlib corpus for `cfg`, keyed by what decides its content."""
    key = {"python": platform.python_version(), "implementation": sys.implementation.name,
           "vocab_size": cfg.tokenizer_vocab_size, "max_bytes": cfg.max_corpus_bytes,
           "version": STDLIB_CACHE_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-v{cfg.tokenizer_vocab_size}-{digest}"
    return os.path.join(os.path.expanduser(cfg.cache_dir), name)


def stdlib_token_file(cfg: DataConfig) -> str:
    """Path of the cached stdlib token file for `cfg`, building it first if needed.

    Safe when many workers start at once: one builds (under a file lock) into a temporary folder
    that is renamed into place when complete; the others wait on the lock, then reuse it.
    """
    folder = stdlib_cache_folder(cfg)
    tokens = os.path.join(folder, "tokens.bin")
    if _complete(tokens):
        return tokens
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with _file_lock(folder + ".lock"):
        if _complete(tokens):  # another process built it while we waited
            return tokens
        tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".tmp-", dir=os.path.dirname(folder))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache shared by several users must be readable
        try:
            started = time.perf_counter()
            paths = stdlib_files()
            meta = prepare_token_file(
                lambda: iter_pieces(paths, cfg.max_corpus_bytes), os.path.join(tmp, "tokens.bin"),
                cfg.tokenizer_vocab_size, tokenizer_out=os.path.join(tmp, "tokenizer.json"),
                extra={"source": "stdlib", "stdlib_root": stdlib_root(), "python": platform.python_version(),
                       "max_corpus_bytes": cfg.max_corpus_bytes})
            try:
                os.rename(tmp, folder)
            except OSError:  # no flock on this system and another process won the race: use theirs
                if not _complete(tokens):
                    raise
            print(f"[moe.data] built the stdlib corpus cache in {time.perf_counter() - started:.1f}s: "
                  f"{meta.extra['text_bytes']} bytes -> {meta.num_tokens} tokens (vocab {meta.vocab_size}) "
                  f"at {folder}", file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return tokens


def _complete(token_path: str) -> bool:
    """True when the token file's sidecar exists and reads: it is written last."""
    try:
        read_meta(token_path)
        return True
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        return False


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Exclusive advisory lock on `path` (flock); a no-op where fcntl does not exist, in which case
    the atomic rename alone keeps concurrent builds correct (just not deduplicated)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: tokenize the user's text files into a token file for `data.source=file`."""
    p = argparse.ArgumentParser(prog="python -m moe.data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_DIR",
                   help="text files, or folders read recursively in sorted order (hidden entries and binary files skipped)")
    p.add_argument("--output", required=True, help="token file to write, e.g. data/tokens.bin")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary to train (default 4096); "
                   "must not exceed model.vocab_size")
    p.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    p.add_argument("--ext", nargs="*", default=[], help="only files with these extensions inside folders, e.g. .txt .md")
    p.add_argument("--max-bytes", type=int, default=None, help="stop after this many bytes of text")
    args = p.parse_args(argv)

    try:
        files = collect_files(args.input, args.ext)
    except FileNotFoundError as e:
        p.error(str(e))
    if not files:
        p.error(f"--input {' '.join(args.input)}: no files found")
    started = time.perf_counter()
    meta = prepare_token_file(lambda: iter_pieces(files, args.max_bytes), args.output, args.vocab_size,
                              tokenizer=args.tokenizer, extra={"source": "prepare", "files": len(files)})
    if meta.num_tokens == 0:
        p.error("the inputs hold no text")
    print(f"wrote {args.output}: {meta.num_tokens} {meta.dtype} tokens from {len(files)} files "
          f"({meta.extra['text_bytes']} bytes) in {time.perf_counter() - started:.1f}s; vocab {meta.vocab_size}, "
          f"tokenizer {meta.tokenizer}\n"
          f"train on it with: data.source=file data.path={os.path.abspath(args.output)} "
          f"(model.vocab_size >= {meta.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
