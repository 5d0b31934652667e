"""Text input: the documents of .txt and .jsonl files, and token windows cut from them."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from neuralink.errors import ProfileError


def read_documents(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The documents of text files: a .txt file is one document, a .jsonl file one per line."""
    documents: list[str] = []
    for path in map(Path, paths):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ProfileError(f"{path}: no such text file") from None
        except UnicodeDecodeError as e:
            raise ProfileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise ProfileError(f"{path}: cannot read ({e.strerror})") from None
        if path.suffix.lower() == ".jsonl":
            documents += _jsonl_documents(path, text)
        elif text.strip():
            documents.append(text)
    return documents


# pieces of about this many characters (~500 tokens) when several calibration texts are interleaved
MIX_CHUNK_CHARS = 2000


def calibration_documents(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The documents of calibration texts; several texts are interleaved.

    Profiling takes the first tokens and the quality check the end, so
    reading the texts one after the other would profile on the first text
    and validate on the last. With more than one text, each text's
    documents are cut at line breaks into pieces of about MIX_CHUNK_CHARS
    characters and the pieces of all texts merged by their relative position
    in their own text: every stretch of the result, its start and its end
    included, holds each text in proportion to its size. One text is read
    as it is.
    """
    per_text = [read_documents([path]) for path in paths]
    if len(per_text) < 2:
        return per_text[0] if per_text else []
    pieces = [[piece for doc in docs for piece in _pieces(doc, MIX_CHUNK_CHARS)] for docs in per_text]
    order = sorted(((i + 0.5) / len(text), t, i) for t, text in enumerate(pieces) for i in range(len(text)))
    return [pieces[t][i] for _, t, i in order]


def _pieces(document: str, size: int) -> list[str]:
    """`document` cut after the first line break at or past every `size` characters (all of it, in order)."""
    out: list[str] = []
    start = 0
    while start < len(document):
        cut = document.find("\n", start + size)
        end = len(document) if cut < 0 else cut + 1
        if document[start:end].strip():
            out.append(document[start:end])
        start = end
    return out


def _jsonl_documents(path: Path, text: str) -> list[str]:
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProfileError(f"{path}:{number}: not a JSON line ({e.msg})") from None
        value = next((record[k] for k in ("text", "prompt") if isinstance(record, dict) and k in record), None)
        if not isinstance(value, str):
            raise ProfileError(f'{path}:{number}: expected an object with a string "text" or "prompt" field')
        if value.strip():
            documents.append(value)
    return documents


def split_windows(documents: Sequence[np.ndarray], per_window: int, max_tokens: int | None) -> list[np.ndarray]:
    """Cut each document's tokens into windows of at most `per_window`, keeping `max_tokens` in all."""
    windows: list[np.ndarray] = []
    budget = math.inf if max_tokens is None else max_tokens
    for tokens in documents:
        tokens = tokens[: int(min(len(tokens), budget))]
        budget -= len(tokens)
        windows += [tokens[i : i + per_window] for i in range(0, len(tokens), per_window)]
        if budget <= 0:
            break
    return windows


def split_heldout(documents: Sequence[str], heldout_chars: int, max_fraction: float = 0.4) -> tuple[list[str], str]:
    """Documents to profile on and a held-out text of about `heldout_chars` characters from their end.

    Whole documents are held out from the last one back; the one that
    straddles the boundary is cut at a line break. At most `max_fraction` of
    the text is held out, so that profiling keeps the larger part.
    """
    total = sum(map(len, documents))
    want = min(heldout_chars, int(total * max_fraction))
    keep, held = list(documents), []
    taken = 0
    while keep and taken < want:
        doc = keep.pop()
        need = want - taken
        if len(doc) <= need:
            held.insert(0, doc)
            taken += len(doc)
            continue
        cut = doc.rfind("\n", 0, len(doc) - need)
        cut = cut if cut > 0 else len(doc) - need
        keep.append(doc[:cut])
        held.insert(0, doc[cut:])
        taken += len(doc) - cut
    return [d for d in keep if d.strip()], "\n".join(held)


def write_documents(path: str | os.PathLike[str], documents: Sequence[str]) -> None:
    """Documents as a calibration JSONL file (one {"text": ...} per line), which calibration_documents reads back."""
    Path(path).write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
