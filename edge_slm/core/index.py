"""The document index: a folder `edge-slm index` writes and `edge-slm ask` reads.

    index.json     format and version, the embedder's identity, dimension and path, the passage
                   budget, every document's sha256 and its passages' range, and the sha256 and
                   size of the two files below
    passages.json  every passage: file (relative to the documents folder), lines [first, last],
                   heading, text and its sentences with their own lines
    vectors.npy    float16 [passages, dimensions], unit length: one row per passage
    sentences.npy  float16 [sentences, dimensions], unit length: one row per sentence of each
                   passage in turn (the extractive answer is picked among them)
    .edge-slm-files.json   what edge-slm wrote (`core.outputs`): only such a folder is replaced

An index is bound to the embedder that made its vectors: another embedder's vectors live in
another space, so its identity (a digest of the embedder bundle's file checksums) is stored and
checked. Torch-free and numpy-only: the device reads and searches it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.hashing import sha256_file
from edge_slm.core.passages import Passage

FORMAT = "edge-slm-index"
VERSION = 1
INDEX_FILE = "index.json"
PASSAGES_FILE = "passages.json"
VECTORS_FILE = "vectors.npy"
SENTENCES_FILE = "sentences.npy"
DATA_FILES = (PASSAGES_FILE, VECTORS_FILE, SENTENCES_FILE)
MAX_INDEX_JSON = 50_000_000  # far beyond any index's own description; refuse anything larger unread


class DocumentIndexError(EdgeSlmError):
    """An index that is missing, corrupt, of another format, or bound to another embedder."""


def embedder_identity(files: Mapping) -> str:
    """One digest of an embedder bundle's files and their sha256 (its manifest's `files`): the
    same weights and tokenizer give the same identity wherever the bundle is copied."""
    digest = hashlib.sha256()
    for name in sorted(files):
        entry = files[name]  # a manifest's FileEntry, or its JSON form
        sha256 = entry["sha256"] if isinstance(entry, Mapping) else entry.sha256
        digest.update(f"{name}\0{sha256}\n".encode())
    return digest.hexdigest()


@dataclass
class DocumentIndex:
    path: Path
    info: dict  # index.json
    passages: list[Passage]
    vectors: np.ndarray  # float32 in memory (numpy has no fast float16 matrix product)
    sentence_vectors: np.ndarray  # float32, every passage's sentences in turn

    def __post_init__(self):
        counts = [len(p.sentences) for p in self.passages]
        self.sentence_start = np.concatenate([[0], np.cumsum(counts)]).astype(int)

    def sentences_of(self, passage: int) -> np.ndarray:
        """The vectors of one passage's sentences."""
        return self.sentence_vectors[self.sentence_start[passage] : self.sentence_start[passage + 1]]

    @property
    def embedder(self) -> dict:
        return self.info["embedder"]

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(passage number, cosine similarity) of the `k` passages nearest a unit-length query."""
        if not len(self.passages):
            return []
        scores = self.vectors @ np.asarray(query, np.float32).reshape(-1)
        k = min(int(k), len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(i), float(scores[i])) for i in top]

    def check_embedder(self, identity: str, where: str) -> None:
        """Refuse an embedder other than the one this index was built with."""
        built = self.embedder
        if identity != built["identity"]:
            raise DocumentIndexError(
                f"{self.path} was built with embedder {built['identity'][:12]} ({built['path']}); {where} is "
                f"{identity[:12]}: give the embedder it was built with (--embedder), or index the documents again"
            )


def write_index(
    folder: Path, info: dict, passages: list[Passage], vectors: np.ndarray, sentence_vectors: np.ndarray
) -> None:
    """Write the data files and index.json into `folder` (a staging folder: `core.outputs.output_folder`)."""
    folder = Path(folder)
    (folder / PASSAGES_FILE).write_text(
        json.dumps([p.to_dict() for p in passages], ensure_ascii=False) + "\n", encoding="utf-8"
    )
    for name, matrix in ((VECTORS_FILE, vectors), (SENTENCES_FILE, sentence_vectors)):
        with open(folder / name, "wb") as handle:
            np.save(handle, np.asarray(matrix, np.float16), allow_pickle=False)
    files = {
        name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size} for name in DATA_FILES
    }
    info = {"format": FORMAT, "version": VERSION, **info, "passages": len(passages), "files": files}
    (folder / INDEX_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_index(path: Path) -> DocumentIndex:
    """The verified index at `path`: format, version and every file's size and sha256 checked."""
    path = Path(path)
    index_file = path / INDEX_FILE
    if not path.is_dir():
        raise DocumentIndexError(
            f"{path}: no such index folder (make one with `edge-slm index DOCS --embedder B --out {path}`)"
        )
    if not index_file.is_file() or index_file.stat().st_size > MAX_INDEX_JSON:
        raise DocumentIndexError(f"{path}: no {INDEX_FILE}, so not an edge-slm index: make one with `edge-slm index`")
    try:
        info = json.loads(index_file.read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            raise ValueError("not an object")
    except (OSError, ValueError, RecursionError) as exc:
        raise DocumentIndexError(f"{index_file}: not valid JSON ({exc}): index the documents again") from None
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise DocumentIndexError(
            f"{path}: {info.get('format')!r} version {info.get('version')!r}, this edge-slm reads {FORMAT} "
            f"version {VERSION}: index the documents again with this edge-slm"
        )
    try:
        data = {}
        for name in DATA_FILES:  # each file read once: what is checked is what is used
            expected, file = info["files"][name], path / name
            if file.is_symlink() or not file.is_file():
                raise DocumentIndexError(f"{file}: missing or not a regular file: index the documents again")
            data[name] = file.read_bytes() if file.stat().st_size == expected["bytes"] else b""
            if len(data[name]) != expected["bytes"] or hashlib.sha256(data[name]).hexdigest() != expected["sha256"]:
                raise DocumentIndexError(f"{file}: checksum mismatch (changed or corrupt): index the documents again")
        passages = [Passage.from_dict(p) for p in json.loads(data[PASSAGES_FILE].decode("utf-8"))]
        vectors = np.load(io.BytesIO(data[VECTORS_FILE]), allow_pickle=False)
        sentence_vectors = np.load(io.BytesIO(data[SENTENCES_FILE]), allow_pickle=False)
        dim = int(info["embedder"]["dim"])
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise DocumentIndexError(
            f"{path}: incomplete index ({type(exc).__name__}: {exc}): index the documents again"
        ) from None
    if vectors.ndim != 2 or vectors.shape != (len(passages), dim) or len(passages) != info.get("passages"):
        raise DocumentIndexError(
            f"{path}: {vectors.shape} vectors for {len(passages)} passages of dimension {dim}: index the documents again"
        )
    sentences = sum(len(p.sentences) for p in passages)
    if sentence_vectors.shape != (sentences, dim):
        raise DocumentIndexError(
            f"{path}: {sentence_vectors.shape} sentence vectors for {sentences} sentences: index the documents again"
        )
    return DocumentIndex(path, info, passages, vectors.astype(np.float32), sentence_vectors.astype(np.float32))
