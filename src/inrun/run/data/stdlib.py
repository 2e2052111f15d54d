"""Python's own standard-library sources as a code corpus that needs no download.

Every ``.py`` file of the running interpreter's standard library (test packages at any depth,
``site-packages`` and ``idlelib`` excluded) is cut into fixed-length byte chunks. A chunk's *source* is its
top-level package (``json``, ``email``, ``encodings``...; single-file modules share
``(modules)``). Validation data comes from *held-out modules*: whole files chosen by a stable
hash of their path, so no validation text is ever a training chunk's neighbour.

The tokenizer is bytes (vocabulary 256): exact, reversible and dependency-free. The code-page
tables under ``encodings/`` (long tuples of escaped characters) are the corpus's own
"meaningless numbers" items.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 256
EXCLUDED_TOP = frozenset({"site-packages", "test", "idlelib", "lib2to3", "pydoc_data", "turtledemo"})
DEFAULT_PACKAGES = (
    "json", "email", "http", "asyncio", "xml", "unittest", "logging", "encodings",
    "collections", "importlib", "concurrent", "urllib", "html", "tomllib", "zoneinfo",
    "(modules)",
)


@dataclass(frozen=True)
class Chunk:
    """One training or validation item: ``length`` bytes of one file starting at ``start``."""

    id: int
    source: str
    path: str
    start: int
    text: str

    @property
    def location(self) -> str:
        return f"{self.path}@{self.start}"


@dataclass
class CodeCorpus:
    """Chunks and their byte tokens ``[N, length]`` (documents shorter than ``length`` padded
    with 0: ``lengths`` says how many bytes each has; ``None``: all full)."""

    chunks: list[Chunk]
    tokens: torch.Tensor
    lengths: list[int] | None = None

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def sources(self) -> dict[int, str]:
        return {c.id: c.source for c in self.chunks}

    def by_id(self) -> dict[int, Chunk]:
        return {c.id: c for c in self.chunks}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_of(rel: Path) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else "(modules)"


def iter_source_files(root: Path | None = None) -> Iterator[tuple[Path, str]]:
    """``(path relative to the stdlib root, source)`` for every eligible file, sorted."""
    root = root or stdlib_root()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in EXCLUDED_TOP or {"test", "tests"} & set(rel.parts[:-1]) or rel.parts[0].startswith("config-"):
            continue
        yield rel, source_of(rel)


def is_validation_file(rel: Path, fraction: float) -> bool:
    """Stable choice of held-out modules: a hash of the path, independent of Python's seed."""
    digest = hashlib.sha1(rel.as_posix().encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def load_stdlib_corpus(
    packages: Sequence[str] | None = DEFAULT_PACKAGES,
    length: int = 128,
    val_fraction: float = 0.1,
    max_train_per_source: int | None = None,
    max_val: int | None = None,
    root: Path | None = None,
    documents: bool = False,
) -> tuple[CodeCorpus, CodeCorpus]:
    """Training chunks and held-out-module validation chunks.

    Args:
        packages: sources to include (``None``: all).
        length: bytes (tokens) per chunk.
        val_fraction: share of *files* held out for validation.
        max_train_per_source: keep at most this many training chunks per source, spread evenly
            over the source's chunks (so every file of a package can appear).
        max_val: at most this many validation chunks, spread evenly over the held-out files.
        documents: cut each file into *documents* of whole lines and varying length (at most
            ``length`` bytes; see :func:`document_pieces`) instead of fixed-length chunks: what
            a packed run packs several to a row.

    Raises:
        FileNotFoundError: if the standard library's sources are not on this machine.
    """
    root = root or stdlib_root()
    wanted = None if packages is None else set(packages)
    train: dict[str, list[tuple[str, int, bytes]]] = {}
    val: list[tuple[str, str, int, bytes]] = []
    n_files = 0
    for rel, source in iter_source_files(root):
        if wanted is not None and source not in wanted:
            continue
        data = (root / rel).read_bytes()
        n_files += 1
        if documents:
            pieces = document_pieces(data, length, rel.as_posix())
        else:
            pieces = [(s, data[s : s + length]) for s in range(0, len(data) - length + 1, length)]
        if is_validation_file(rel, val_fraction):
            val.extend((source, rel.as_posix(), s, b) for s, b in pieces)
        else:
            train.setdefault(source, []).extend((rel.as_posix(), s, b) for s, b in pieces)
    if n_files == 0:
        raise FileNotFoundError(
            f"no standard-library sources found under {root} (packages={packages}); this "
            "Python installation ships without its .py files"
        )
    rows: list[tuple[str, str, int, bytes]] = []
    for source in sorted(train):
        items = _spread(train[source], max_train_per_source)
        rows.extend((source, p, s, b) for p, s, b in items)
    val = _spread(val, max_val)
    return _corpus(rows, 0, length), _corpus(val, 1_000_000, length)


MIN_DOCUMENT = 16  # bytes: shorter pieces (a blank line, a lone bracket) join the next one


def document_pieces(data: bytes, length: int, key: str) -> list[tuple[int, bytes]]:
    """A file cut into documents of whole lines: ``(start, bytes)``, each at most ``length``
    bytes (a longer line is cut), most between ``length / 8`` and ``length / 2`` (about three to a
    row when packed) by a stable hash of ``key`` and the start (the same documents on every
    machine and run): a document ends at the last line end within its size."""
    lines = data.splitlines(keepends=True)
    out: list[tuple[int, bytes]] = []
    start, piece = 0, b""
    target = _target(key, 0, length)
    for line in lines:
        while len(line) > length:  # a line longer than a document: cut
            if piece:
                out.append((start, piece))
                start, piece = start + len(piece), b""
            out.append((start, line[:length]))
            start, line = start + length, line[length:]
            target = _target(key, start, length)
        if piece and len(piece) + len(line) > target and len(piece) >= MIN_DOCUMENT:
            out.append((start, piece))
            start, piece = start + len(piece), b""
            target = _target(key, start, length)
        if len(piece) + len(line) > length:  # a short piece that the line would overflow: dropped
            start, piece = start + len(piece), b""
        piece += line
    if len(piece) >= MIN_DOCUMENT:
        out.append((start, piece))
    return out


def _target(key: str, start: int, length: int) -> int:
    digest = hashlib.sha1(f"{key}@{start}".encode()).digest()
    low, high = length // 8, max(length // 2, length // 8 + 1)
    return max(MIN_DOCUMENT, low + int.from_bytes(digest[:4], "big") % (high - low + 1))


def _spread(items: list, limit: int | None) -> list:
    if limit is None or len(items) <= limit:
        return items
    step = len(items) / limit
    return [items[int(k * step)] for k in range(limit)]


def _corpus(rows: list[tuple[str, str, int, bytes]], first_id: int, length: int) -> CodeCorpus:
    chunks = [
        Chunk(first_id + i, source, path, start, data.decode("utf-8", errors="replace"))
        for i, (source, path, start, data) in enumerate(rows)
    ]
    lengths = [len(data) for *_, data in rows]
    tokens = torch.zeros(len(rows), length if rows else 0, dtype=torch.long)
    for r, (*_, data) in enumerate(rows):
        tokens[r, : len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return CodeCorpus(chunks, tokens, None if all(n == length for n in lengths) else lengths)


def decode(tokens: torch.Tensor) -> str:
    """Byte tokens back to text."""
    return bytes(tokens.tolist()).decode("utf-8", errors="replace")
