"""The build's stage contract (build/runner.py): every stage of every shipped profile, decoder and
encoder, is run(artifact, section of the profile, out_dir, note) -> artifact; the runner threads
the artifacts, numbers the progress from the list and publishes only a build whose stages all ran."""

import inspect
from pathlib import Path

import pytest

from edge_slm.builder.decoder.pipeline import stages
from edge_slm.builder.encoder.pipeline import encoder_stages
from edge_slm.builder.runner import Stage, no_section, run_stages
from edge_slm.core.bundle import write_manifest
from edge_slm.core.targets import known_targets, load_profile


@pytest.mark.parametrize("target", known_targets())
def test_every_stage_of_every_profile_has_one_shape(target):
    profile = load_profile(target)
    for plan, quantized in (
        (stages(profile), profile.quantize.precision != "fp32"),
        (encoder_stages(profile), profile.encoder.precision != "fp32"),
    ):
        names = [stage.name for stage in plan]
        assert names[0] == "load" and names[-2:] == ["tokenizer", "manifest"]
        assert ("precision" in names) == ("gate" in names) == quantized
        for stage in plan:
            parameters = list(inspect.signature(stage.run).parameters)
            assert len(parameters) == 4 and parameters[2:] == ["out_dir", "note"], (stage.name, parameters)
            assert stage.into in ("bundle", "scratch", "cache")
            stage.section(profile)  # each names a part of this profile that exists
        export = plan[names.index("export")]
        # A quantized build's fp32 graph is an intermediate; an fp32 build's is the bundle's.
        assert export.into == ("scratch" if quantized else "bundle")


def _stage(name, into="bundle", fail=False):
    def run(artifact, section, out_dir: Path, note):
        note(f"{name} in {out_dir.name}")
        if fail:
            raise RuntimeError(f"{name} failed")
        (out_dir / f"{name}.txt").write_text(str(artifact))
        if name == "manifest":
            write_manifest(out_dir, {"stages": artifact + [name]})
        return artifact + [name]

    return Stage(name, lambda artifact, profile: f"running {name}", no_section, run, into)


def test_the_runner_threads_artifacts_numbers_progress_and_publishes_only_success(tmp_path):
    profile = load_profile("x86-laptop")
    lines = []
    out = tmp_path / "bundle"
    plan = [_stage("a"), _stage("b", into="scratch"), _stage("manifest")]
    assert run_stages(plan, [], profile, out, lines.append) == ["a", "b", "manifest"]
    assert [line.split("  (")[0] for line in lines if line.startswith("[")] == [
        "[1/3] running a",
        "[2/3] running b",
        "[3/3] running manifest",
    ]
    # Bundle stages wrote into the published folder, the scratch stage beside it (now removed).
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "manifest.json", "manifest.txt"]
    assert (out / "manifest.txt").read_text() == "['a', 'b']"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]

    failed, failed_lines = tmp_path / "failed", []
    with pytest.raises(RuntimeError, match="b failed"):
        run_stages([_stage("a"), _stage("b", fail=True), _stage("manifest")], [], profile, failed, failed_lines.append)
    assert [line.split("  (")[0] for line in failed_lines if line.startswith("[")] == [
        "[1/3] running a",
        "[2/3] running b",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # nothing published, no staging or scratch left
