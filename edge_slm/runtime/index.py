"""Build a document index on the device: `edge-slm index DOCS --embedder BUNDLE --out INDEX`.

    from edge_slm.runtime.index import build_index
    stats = build_index("manuals/", "export/x86-laptop-embedder", "manuals.index")

Reads every .txt and .md file under DOCS (and .pdf when pypdf is installed: `edge-slm[pdf]`),
splits them into passages (`core.passages`) sized to the embedder, embeds each passage once and
writes the index (`core.index`) atomically. When INDEX is an earlier index made with the same
embedder, the passages and vectors of every document whose sha256 did not change are reused, so
adding one manual to a folder of fifty embeds only that one.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.hashing import sha256_file
from edge_slm.core.index import DocumentIndexError, embedder_identity, read_index, write_index
from edge_slm.core.outputs import output_folder
from edge_slm.core.passages import Passage, passages
from edge_slm.core.text import check_text

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
PDF_SUFFIX = ".pdf"
# all-MiniLM-L6-v2 was trained on texts of up to 128 tokens and takes 256: half the maximum keeps a
# passage about one thing, which is what a question's vector is compared with.
PASSAGE_SHARE_OF_MAX_LENGTH = 0.5


@dataclass(frozen=True)
class IndexStats:
    documents: int
    passages: int
    embedded: int  # passages embedded in this run
    reused: int  # passages (and vectors) taken from the previous index, their document unchanged
    skipped: list[str]  # files not read, with the reason
    seconds: float


def open_embedder(bundle, threads: int | None = None):
    """The embedder bundle as an `Encoder`, refused in one line if it is not one."""
    from edge_slm.runtime.encoder import Encoder
    from edge_slm.runtime.model import load

    model = load(bundle, threads=threads)
    if not isinstance(model, Encoder) or model.task != "embedding":
        raise EdgeSlmError(f"{bundle} is not an embedder bundle: build one with `make embedder` and pass it")
    return model


def identity_of(encoder) -> str:
    return embedder_identity(encoder.manifest.files)


def passage_budget(encoder) -> int:
    return max(16, int(encoder.max_length * PASSAGE_SHARE_OF_MAX_LENGTH))


def document_files(docs: Path, out: Path) -> tuple[list[Path], list[str]]:
    """The documents under `docs` in a stable order, and the files skipped with why (never a link,
    nothing hidden, nothing inside the index being written)."""
    docs = Path(docs)
    if not docs.exists():
        raise EdgeSlmError(f"{docs}: no such file or folder: give the folder holding your .txt and .md documents")
    if docs.is_file():
        return [docs], []
    out_abs, found, skipped = Path(out).absolute(), [], []
    for path in sorted(docs.rglob("*")):
        relative = path.relative_to(docs)
        if any(part.startswith(".") for part in relative.parts) or path.absolute() == out_abs:
            continue
        if out_abs in path.absolute().parents or not path.is_file():
            continue
        if path.is_symlink():  # a link may lead anywhere on the device; the folder is what was given
            skipped.append(f"{relative}: a symbolic link, not followed")
            continue
        suffix = path.suffix.lower()
        if suffix == PDF_SUFFIX and importlib.util.find_spec("pypdf") is None:
            skipped.append(f"{relative}: PDF needs pypdf (pip install 'edge-slm[pdf]')")
        elif suffix in TEXT_SUFFIXES or suffix == PDF_SUFFIX:
            found.append(path)
    if not found:
        raise EdgeSlmError(f"{docs}: no .txt or .md documents in it: give the folder holding your documents")
    return found, skipped


def document_text(path: Path) -> str:
    if path.suffix.lower() == PDF_SUFFIX:
        return pdf_text(path)
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    return check_text(text, str(path)).replace("\r\n", "\n")


def pdf_text(path: Path) -> str:
    """A PDF's text, pages one after another (lines are then lines of the extracted text)."""
    import pypdf

    try:
        reader = pypdf.PdfReader(str(path))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except Exception as exc:  # pypdf raises many types for a broken file
        raise EdgeSlmError(f"{path}: pypdf cannot read it ({type(exc).__name__}: {exc}): fix or remove it") from None


def _previous(out: Path, identity: str, budget: int, echo: Callable[[str], None]):
    """The index already at `out`, if it can be reused (same embedder and passage budget)."""
    if not (Path(out) / "index.json").is_file():
        return None
    try:
        old = read_index(out)
    except DocumentIndexError as exc:
        echo(f"the previous index cannot be reused ({exc}); embedding every document")
        return None
    if old.embedder["identity"] != identity or old.info.get("budget_tokens") != budget:
        echo("the previous index was made with another embedder (or passage size); embedding every document")
        return None
    return old


def build_index(
    docs: str | Path,
    embedder,
    out: str | Path,
    echo: Callable[[str], None] = lambda message: None,
    threads: int | None = None,
) -> IndexStats:
    """Index the documents under `docs` with `embedder` (a bundle path or a loaded `Encoder`) into
    the folder `out` (new, empty, or an index edge-slm wrote)."""
    started = time.perf_counter()
    docs, out = Path(docs), Path(out)
    encoder = open_embedder(embedder, threads) if isinstance(embedder, (str, Path)) else embedder
    identity, budget = identity_of(encoder), passage_budget(encoder)
    files, skipped = document_files(docs, out)
    root = docs if docs.is_dir() else docs.parent
    with output_folder(out, "edge-slm index") as staging:
        old = _previous(out, identity, budget, echo)
        all_passages: list[Passage] = []
        rows: list[np.ndarray | None] = []  # one per passage, None until embedded
        sentence_rows: list[np.ndarray | None] = []  # one per sentence of each passage in turn
        documents, to_embed, changed = {}, [], 0
        for path in files:
            name = path.relative_to(root).as_posix()
            digest = sha256_file(path)
            first = len(all_passages)
            kept = old and old.info["documents"].get(name)
            if kept and kept["sha256"] == digest:
                start, end = kept["passages"]
                all_passages.extend(old.passages[start:end])
                rows.extend(old.vectors[start:end])
                sentence_rows.extend(old.sentence_vectors[old.sentence_start[start] : old.sentence_start[end]])
            else:
                made = passages(name, document_text(path), budget, encoder.graph.token_counts)
                changed += 1
                to_embed.extend(range(first, first + len(made)))
                all_passages.extend(made)
                rows.extend([None] * len(made))
                sentence_rows.extend([None] * sum(len(p.sentences) for p in made))
            documents[name] = {"sha256": digest, "passages": [first, len(all_passages)]}
        if to_embed:
            echo(f"embedding {len(to_embed)} passages of {changed} new or changed documents, and their sentences")
            _embed_into(rows, to_embed, [all_passages[i].embedding_text() for i in to_embed], encoder)
            starts = np.cumsum([0] + [len(p.sentences) for p in all_passages])
            slots = [int(starts[i]) + j for i in to_embed for j in range(len(all_passages[i].sentences))]
            texts = [text for i in to_embed for text in all_passages[i].sentence_texts()]
            _embed_into(sentence_rows, slots, texts, encoder)
        dim = int(encoder.graph.output_width)
        info = {
            "embedder": {
                "identity": identity,
                "path": str(Path(encoder.path).absolute()),
                "dim": dim,
                "max_sequence_length": int(encoder.max_length),
            },
            "budget_tokens": budget,
            "documents": documents,
        }
        write_index(staging, info, all_passages, _matrix(rows, dim), _matrix(sentence_rows, dim))
    return IndexStats(
        len(files),
        len(all_passages),
        len(to_embed),
        len(all_passages) - len(to_embed),
        skipped,
        time.perf_counter() - started,
    )


def _embed_into(rows: list, slots: list[int], texts: list[str], encoder) -> None:
    """Embed `texts` (unit length) into `rows` at `slots`; this count is what a re-index saves."""
    vectors = encoder.embed(texts)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    for slot, row in zip(slots, vectors):
        rows[slot] = row


def _matrix(rows: list, dim: int) -> np.ndarray:
    return np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
