"""The CLI as a careless user meets it: outputs never replace what edge-slm did not write (report,
embed, finetune, bench --out), a killed process's temporary files are swept, and text that is not
valid Unicode (argv bytes, bad UTF-8 in files, JSON surrogate escapes) or absurd training data is
one line naming where it is, exit code 2, before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_slm.core.outputs import FILES_LIST


def run(*args, timeout=300) -> subprocess.CompletedProcess:
    """The CLI in a fresh process; str arguments go through os.fsencode, so a surrogate such as
    '\\udcff' reaches the command as the raw byte 0xff, as a shell's $'\\xff' does."""
    return subprocess.run(
        [sys.executable, "-m", "edge_slm.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def refused(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {message}"], proc.stderr


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder`: file bytes, link targets, folders by name."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            entries[rel] = "link -> " + os.readlink(path)
        elif path.is_dir():
            entries[rel] = "dir"
        else:
            entries[rel] = path.read_bytes()
    return entries


@pytest.fixture(scope="module")
def results(tiny_bundle, tmp_path_factory) -> Path:
    """Real bench records of the tiny bundle, appended by `bench --out` to a new file."""
    out = tmp_path_factory.mktemp("results") / "new" / "results.jsonl"
    proc = run(
        "bench", tiny_bundle, "-r", "1", "--warmup", "0", "--threads", "1", "--no-accuracy",
        "--prompt-tokens", "8", "--gen-tokens", "4", "--out", out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(out.read_text().splitlines()) == 1
    return out


# -- report --out ---------------------------------------------------------------------------------


def test_report_refuses_a_users_folder_and_leaves_it_byte_identical(results, tmp_path):
    mine = tmp_path / "docs"
    mine.mkdir()
    (mine / "report.md").write_text("# my own report, written by hand\n")
    (mine / "report.html").write_text("<p>mine</p>\n")
    (mine / "speed.png").write_bytes(b"\x89PNG my plot")
    before = snapshot(mine)
    refused(
        run("report", results, "--out", mine),
        f"--out {mine} holds files edge-slm did not list as its own (no {FILES_LIST}): "
        "edge-slm replaces only folders it wrote itself; choose another --out or move that away",
    )
    assert snapshot(mine) == before
    plain = tmp_path / "notes.txt"
    plain.write_text("notes\n")
    refused(run("report", results, "--out", plain), f"--out {plain} is a file, not a directory: choose another --out")
    assert plain.read_text() == "notes\n"


def test_a_report_folder_edge_slm_wrote_is_regenerated_and_nothing_else(results, tmp_path):
    out = tmp_path / "report"
    first = run("report", results, "--out", out)
    assert first.returncode == 0, first.stderr
    listed = json.loads((out / FILES_LIST).read_text())
    assert listed["written_by"] == "edge-slm report"
    assert set(listed["files"]) == {p.name for p in out.iterdir()} - {FILES_LIST} >= {"report.md", "report.html"}
    assert all(p.name in first.stdout for p in out.iterdir() if p.name != FILES_LIST)

    (out / "report.md").write_text("stale\n")  # an edit is the user's: the folder is no longer edge-slm's alone
    refused(
        run("report", results, "--out", out),
        f"--out {out} holds report.md, changed since edge-slm wrote it: edge-slm replaces only folders it "
        "wrote itself; choose another --out or move that away",
    )
    assert (out / "report.md").read_text() == "stale\n"
    (out / "report.md").unlink()
    again = run("report", results, "--out", out)
    assert again.returncode == 0, again.stderr
    assert "# edge-slm benchmark report" in (out / "report.md").read_text()
    assert not list(tmp_path.glob("report.*-*"))  # no staging or old copy left beside it

    (out / "README.md").write_text("my notes about this run\n")
    before = snapshot(out)
    refused(
        run("report", results, "--out", out),
        f"--out {out} holds README.md, which edge-slm did not write: edge-slm replaces only folders it wrote "
        "itself; choose another --out or move that away",
    )
    assert snapshot(out) == before


def test_report_never_writes_through_a_link(results, tmp_path):
    out = tmp_path / "report"
    assert run("report", results, "--out", out).returncode == 0
    victim = tmp_path / "elsewhere.md"
    victim.write_text("outside the report folder\n")
    (out / "report.md").unlink()
    (out / "report.md").symlink_to(victim)
    refused(
        run("report", results, "--out", out),
        f"--out {out} holds report.md, a symbolic link edge-slm did not make: edge-slm replaces only folders "
        "it wrote itself; choose another --out or move that away",
    )
    assert victim.read_text() == "outside the report folder\n" and (out / "report.md").is_symlink()
    link = tmp_path / "link"
    link.symlink_to(out)
    refused(
        run("report", results, "--out", link),
        f"--out {link} is a symbolic link: give the real directory or a new path",
    )


# -- embed --out ----------------------------------------------------------------------------------


def test_embed_replaces_no_file_it_was_not_told_to(embedder_bundles, tmp_path):
    bundle = embedder_bundles[0]
    vectors = tmp_path / "data.npy"
    np.save(vectors, np.arange(6.0))
    before = vectors.read_bytes()
    refused(
        run("embed", bundle, "hello", "--out", vectors),
        f"--out {vectors} already exists: choose a new name, or add --overwrite to replace it",
    )
    assert vectors.read_bytes() == before
    vectors.chmod(0o444)
    refused(
        run("embed", bundle, "hello", "--out", vectors, "--overwrite"),
        f"--out {vectors} is read-only: edge-slm will not replace it; choose a new name",
    )
    assert vectors.read_bytes() == before
    vectors.chmod(0o644)
    notes = tmp_path / "notes.npy"
    notes.write_text("my notes")
    refused(
        run("embed", bundle, "hello", "--out", notes, "--overwrite"),
        f"--out {notes} exists and is not a NumPy file; edge-slm will not replace it: choose a new name",
    )
    link = tmp_path / "link.npy"
    link.symlink_to(vectors)
    refused(
        run("embed", bundle, "hello", "--out", link, "--overwrite"),
        f"--out {link} is a symbolic link: edge-slm will not write through it; give a new file name",
    )
    folder = tmp_path / "dir.npy"
    folder.mkdir()
    refused(run("embed", bundle, "hello", "--out", folder), f"--out {folder} is a directory: give a .npy file name")
    assert vectors.read_bytes() == before and notes.read_text() == "my notes"

    done = run("embed", bundle, "hello", "there", "--out", vectors, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert np.load(vectors).shape == (2, 32)


def test_a_dead_process_temporary_file_is_swept_and_a_live_one_kept(embedder_bundles, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        target = tmp_path / "v.npy"
        stale = tmp_path / f"v.npy.tmp-{dead.pid}"
        running = tmp_path / f"v.npy.tmp-{live.pid}"
        stale_dir = tmp_path / f"v.npy.old-{dead.pid}"
        other_target = tmp_path / f"w.npy.tmp-{dead.pid}"
        users = tmp_path / "v.npy.tmp-notes"
        for path in (stale, running, other_target, users):
            path.write_bytes(b"half-written")
        stale_dir.mkdir()
        (stale_dir / "x").write_text("x")
        proc = run("embed", embedder_bundles[0], "hello", "--out", target)
        assert proc.returncode == 0, proc.stderr
        assert not stale.exists() and not stale_dir.exists()
        assert running.read_bytes() == b"half-written"  # its process may still finish it
        assert other_target.exists() and users.exists()  # another target's, and not a name edge-slm makes
    finally:
        live.kill()
        live.wait()


# -- finetune --out -------------------------------------------------------------------------------


def _intents(tmp_path: Path, n: int = 24) -> Path:
    from edge_slm.core.labelled import INTENTS_TRAIN, read_examples

    rows = [e for e in read_examples(INTENTS_TRAIN) if e.label in ("lights", "music")][:n]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in rows))
    return path


def test_finetune_over_its_own_output_keeps_what_the_user_added(tiny_embedder, tmp_path):
    data = _intents(tmp_path)
    out = tmp_path / "clf"
    args = ["finetune", "--model", tiny_embedder, "--data", data, "--out", out, "--epochs", "1", "--batch-size", "8"]
    first = run(*args)
    assert first.returncode == 0, first.stderr
    assert json.loads((out / FILES_LIST).read_text())["written_by"] == "edge-slm finetune"

    (out / "README.md").write_text("# my classifier\n")
    (out / "experiments").mkdir()
    (out / "experiments" / "run1.txt").write_text("lr 2e-3 was better\n")
    before = snapshot(out)
    started = time.monotonic()
    refused(
        run(*args),
        f"--out {out} holds README.md, which edge-slm did not write: edge-slm replaces only folders it wrote "
        "itself; choose another --out or move that away",
    )
    assert time.monotonic() - started < 60  # refused before training
    assert snapshot(out) == before

    (out / "README.md").unlink()
    refused(
        run(*args),
        f"--out {out} holds experiments, which edge-slm did not write: edge-slm replaces only folders it wrote "
        "itself; choose another --out or move that away",
    )
    assert (out / "experiments" / "run1.txt").read_text() == "lr 2e-3 was better\n"
    (out / "experiments" / "run1.txt").unlink()
    (out / "experiments").rmdir()
    again = run(*args)
    assert again.returncode == 0, again.stderr  # its own output, untouched, is regenerated
    assert not list(tmp_path.glob("clf.*-*")) and not list(tmp_path.glob(".clf.*"))


# -- bench --out ----------------------------------------------------------------------------------


def test_bench_appends_only_to_a_file_of_bench_records(tiny_bundle, results, tmp_path):
    scores = tmp_path / "scores.csv"
    scores.write_text("model,score\nmine,0.93")
    started = time.monotonic()
    refused(
        run("bench", tiny_bundle, "-r", "1", "--warmup", "0", "--out", scores),
        f"--out {scores}:1: not a JSON record; bench appends only to its own results files: choose another --out",
    )
    assert time.monotonic() - started < 30 and scores.read_text() == "model,score\nmine,0.93"
    refused(
        run("bench", tiny_bundle, "--out", tmp_path),
        f"--out {tmp_path} is a directory: give a .jsonl file name, e.g. {tmp_path / 'results.jsonl'}",
    )
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(results.read_text() + '{"score": 1}\n')
    refused(
        run("bench", tiny_bundle, "--out", mixed),
        f"--out {mixed}:2: not an edge-slm benchmark record (no 'schema': 'edge-slm-bench/...'); "
        "bench appends only to its own results files: choose another --out",
    )
    link = tmp_path / "link.jsonl"
    link.symlink_to(results)
    refused(
        run("bench", tiny_bundle, "--out", link),
        f"--out {link} is a symbolic link: give the results file itself or a new file name",
    )

    unterminated = tmp_path / "r.jsonl"
    unterminated.write_text(results.read_text().rstrip("\n"))  # a last line without its newline
    proc = run(
        "bench", tiny_bundle, "-r", "1", "--warmup", "0", "--threads", "1", "--no-accuracy",
        "--prompt-tokens", "8", "--gen-tokens", "4", "--out", unterminated,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = unterminated.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["schema"].startswith("edge-slm-bench/") for line in lines)


# -- text that is not valid Unicode ---------------------------------------------------------------


def test_undecodable_arguments_are_one_line_before_the_model_loads(tiny_bundle, classifier_bundle, tmp_path):
    missing = tmp_path / "no-bundle"  # the text is checked first: no model is opened
    for bundle in (tiny_bundle, missing):
        refused(
            run("generate", bundle, "hi \udcff", "--chat"),
            "PROMPT (argument 2): byte 0xff at character 4 is not valid UTF-8; pass UTF-8 text",
        )
    refused(
        run("generate", tiny_bundle, "hi", "--stop", "\udce9"),
        "--stop 1: byte 0xe9 at character 1 is not valid UTF-8; pass UTF-8 text",
    )
    for bundle in (classifier_bundle, missing):
        refused(
            run("classify", bundle, "lights on", "caf\udce9"),
            "TEXT argument 2: byte 0xe9 at character 4 is not valid UTF-8; pass UTF-8 text",
        )
    texts = tmp_path / "texts.txt"
    texts.write_bytes("lights on\n\u2028music please\nplay caf\xe9 jazz\n".encode() + b"bad \xff byte\n")
    refused(
        run("classify", missing, "--file", texts),
        f"{texts}:4: byte 0xff at character 5 is not valid UTF-8; pass UTF-8 text",
    )  # line 4 as an editor counts: U+2028 does not end a line
    story = tmp_path / "story.txt"
    story.write_bytes(b"once upon\na time \xff\n")
    refused(
        run("eval", tiny_bundle, "--text", story),
        f"{story}:2: byte 0xff at character 8 is not valid UTF-8; pass UTF-8 text",
    )


def test_the_python_api_refuses_lone_surrogates_with_a_typed_error(tiny_bundle, classifier_bundle, embedder_bundles):
    from edge_slm import runtime
    from edge_slm.core.errors import EdgeSlmError
    from edge_slm.runtime.encoder import InputError

    classifier = runtime.load(classifier_bundle)
    with pytest.raises(InputError, match=r"^text 2: character 3 is a lone surrogate \(U\+D800\), not text"):
        classifier.classify(["lights on", "ab\ud800"])
    with pytest.raises(InputError, match=r"^text 1: byte 0xff at character 1 is not valid UTF-8"):
        runtime.load(embedder_bundles[0]).embed("\udcff")
    model = runtime.load(tiny_bundle)
    with pytest.raises(EdgeSlmError, match=r"^message 0: character 4 is a lone surrogate \(U\+DFFF\)"):
        model.generate("hi \udfff", chat=True, max_new_tokens=2)
    with pytest.raises(EdgeSlmError, match=r"^the text: byte 0xff at character 4 is not valid UTF-8"):
        model.generate("hi \udcff", max_new_tokens=2)
    assert model.generate("hi", chat=True, max_new_tokens=2).token_ids  # the model still works


# -- fine-tuning data -----------------------------------------------------------------------------

GOOD = '{"text": "turn on the lights", "label": "lights"}\n{"text": "play jazz", "label": "music"}\n'


@pytest.mark.parametrize(
    "line, message",
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply; write one flat {'text', 'label'} per line"),
        ('{"text": "x", "label": ' + "7" * 5000 + "}", "a number of 5,000 digits; the limit is 100"),
        (
            '{"text": "lights \\ud800 on", "label": "lights"}',
            "'text': character 8 is a lone surrogate (U+D800), not text; pass UTF-8 text",
        ),
        ('{"text": "on", "label": "' + "l" * 300 + '"}', "the label has 300 characters; the limit is 200"),
    ],
    ids=["deep", "long-number", "surrogate", "long-label"],
)
def test_bad_finetune_data_is_one_line_with_file_and_line(tmp_path, line, message):
    data = tmp_path / "train.jsonl"
    data.write_text(GOOD + line + "\n")
    refused(run("finetune", "--data", data, "--out", tmp_path / "out"), f"{data}:3: {message}")
    assert not (tmp_path / "out").exists()


def test_finetune_data_bytes_bom_and_class_count(tmp_path):
    from edge_slm.core.labelled import DataError, read_examples

    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(GOOD.encode() + b'{"text": "caf\xe9", "label": "music"}\n')
    refused(
        run("finetune", "--data", raw, "--out", tmp_path / "out"),
        f"{raw}:3: byte 0xe9 at character 14 is not valid UTF-8; pass UTF-8 text",
    )
    excel = tmp_path / "excel.csv"
    excel.write_bytes(b"\xef\xbb\xbftext,label\r\nturn on the lights,lights\r\nplay jazz,music\r\n")
    assert [(e.text, e.label) for e in read_examples(excel)] == [
        ("turn on the lights", "lights"),
        ("play jazz", "music"),
    ]
    bom_jsonl = tmp_path / "bom.jsonl"
    bom_jsonl.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert [e.label for e in read_examples(bom_jsonl)] == ["lights", "music"]
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_bytes(b"text,label\nplay jazz,music\nlights \xff,lights\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: 'text': byte 0xff at character 8 is not valid UTF-8"):
        read_examples(bad_csv)
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"text": f"text {i}", "label": f"id-{i}"}) + "\n" for i in range(1001)))
    refused(
        run("finetune", "--data", many, "--out", tmp_path / "out"),
        f"{many}: 1,001 different labels; a classifier here takes at most 1,000 "
        "(is 'label' the class of each text, not an id of the example?)",
    )
