"""Text corpora as a stream of pieces: Python's standard library (no download) or the user's files.

A corpus is an ordered list of files. `iter_pieces` reads them as `(text, ends_document)` pieces of
about `piece_bytes` each, so a huge file never has to sit in memory whole and the tokenizer can put
an end-of-document token exactly where one file ends.
"""
from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence

Piece = tuple[str, bool]
"""A chunk of text and whether it is the last chunk of its document (file)."""

# Third-party packages can sit inside the stdlib folder; they differ between machines with the
# same Python, so they would make the "same corpus everywhere" promise false.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> str:
    """Folder holding the standard library's `.py` sources of the running interpreter."""
    root = sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__)
    return os.path.realpath(root)


def stdlib_files() -> list[str]:
    """All `.py` files of the standard library, sorted by their path relative to `stdlib_root()`,
    so the order (and so a capped corpus) is identical on every machine with the same Python."""
    root = stdlib_root()
    rel: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        rel += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith(".py")]
    # Sort on "/"-joined parts rather than the OS spelling so the order never depends on os.sep.
    rel.sort(key=lambda p: p.replace(os.sep, "/"))
    return [os.path.join(root, p) for p in rel]


def collect_files(inputs: Sequence[str], extensions: Iterable[str] = ()) -> list[str]:
    """Expand files and folders (recursively, sorted, hidden entries skipped) into a file list.

    `extensions` (e.g. `[".txt", ".md"]`) filters files found inside folders; files named directly
    are always kept. Raises FileNotFoundError for an input that does not exist.
    """
    exts = tuple(e if e.startswith(".") else "." + e for e in extensions)
    out: list[str] = []
    for item in inputs:
        path = os.path.expanduser(item)
        if os.path.isfile(path):
            out.append(path)
        elif os.path.isdir(path):
            found: list[str] = []
            for folder, dirs, files in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS]
                found += [os.path.join(folder, f) for f in files
                          if not f.startswith(".") and (not exts or f.endswith(exts))]
            out += sorted(found)
        else:
            raise FileNotFoundError(f"--input {item!r}: no such file or folder")
    return out


def looks_binary(path: str) -> bool:
    """True when the first 8 KiB hold a NUL byte, the same test git uses to spot binary files."""
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def iter_pieces(paths: Sequence[str], max_bytes: int | None = None, piece_bytes: int = 1 << 20) -> Iterator[Piece]:
    """Read `paths` in order as UTF-8 text pieces, at most `max_bytes` bytes in all.

    Undecodable bytes become U+FFFD rather than failing (a few stdlib test files are Latin-1 on
    purpose); binary files are skipped. The cap cuts at a line boundary, so the last document may
    be a prefix of its file. Line endings are kept exactly (`newline=""`).
    """
    total = 0
    for path in paths:
        if looks_binary(path):
            continue
        buf: list[str] = []
        size = 0
        emitted = False  # a piece of this file went out already, so its end must be marked
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            for line in f:
                n = len(line.encode("utf-8"))
                if max_bytes is not None and total + n > max_bytes:
                    if buf or emitted:
                        yield "".join(buf), True
                    return
                buf.append(line)
                size += n
                total += n
                if size >= piece_bytes:
                    yield "".join(buf), False
                    buf, size, emitted = [], 0, True
        if buf or emitted:
            yield "".join(buf), True
