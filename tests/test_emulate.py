"""A bundle run on an emulated Raspberry Pi CPU (qemu-user-static, aarch64 onnxruntime 1.27.0)
against the host: same prompt ids, same greedy tokens, logits within tolerance.
`make test` installs qemu-user-static; the sysroot is prepared once and cached."""

import shutil
import subprocess
import sys

import pytest

from edge_slm.core.bundle import read_manifest
from edge_slm.harness.agreement import greedy_agreement
from edge_slm.harness.emulate import verify
from edge_slm.runtime.probe import greedy_trace


def compare(host, other, bundle, precision):
    return greedy_agreement(host, other, read_manifest(bundle).profile.as_profile(), precision)


def test_tiny_bundle_agrees_under_emulated_cortex_a72(tiny_bundle):
    assert shutil.which("qemu-aarch64-static"), "qemu-user-static is not installed: run `make test`, which installs it"
    result = verify(tiny_bundle, "cortex-a72", onnxruntime="1.27.0", tokens=8, threads=1)
    assert result["onnxruntime"] == "1.27.0" and result["cpu"] == "cortex-a72"
    assert result["same_prompt_ids"] and result["tokens_agreeing"] == 8
    assert result["max_relative_logit_diff"] <= 1e-3 and result["passed"]


def test_disagreement_is_reported(tiny_bundle):
    host = greedy_trace(tiny_bundle, tokens=4, threads=1)
    other = dict(host, tokens=host["tokens"][:2] + [host["tokens"][2] + 1, host["tokens"][3]])
    result = compare(host, other, tiny_bundle, "fp32")
    assert not result["passed"] and result["tokens_agreeing"] == 2 and result["max_relative_logit_diff"] == 0.0
    assert result["summary"] == (
        f"2/4 greedy tokens as on this machine ({other['text']!r}), largest logit difference 0.000% of the "
        "largest logit (tolerance 0.1%)"
    )
    moved = compare(host, dict(host, prompt_ids=[0] + host["prompt_ids"]), tiny_bundle, "fp32")
    assert moved["same_prompt_ids"] is False and not moved["passed"] and "different prompt ids" in moved["summary"]


def test_cli_verify_prints_the_verdict_and_its_numbers(tiny_bundle):
    """fp32 with next-token statistics: reported, not judged by a budget (fp32 is the reference)."""
    proc = subprocess.run(
        [sys.executable, "-m", "edge_slm.cli", "verify", str(tiny_bundle), "--emulate", "cortex-a72"]
        + ["--onnxruntime", "1.27.0", "--tokens", "2", "--eval-tokens", "16"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("PASSED: Raspberry Pi 4 (cortex-a72, emulated), onnxruntime 1.27.0 aarch64 vs host")
    assert "greedy tokens agreeing: 2/2" in lines[1] and "(tolerance 0.1%)" in lines[1]
    assert "over 16 tokens of eval.txt: next-token agreement 100.0%, perplexity" in lines[3]
    assert "fp32 has no budget)" in lines[3]


def test_cli_rejects_unknown_cpu(tiny_bundle):
    proc = subprocess.run(
        [sys.executable, "-m", "edge_slm.cli", "verify", str(tiny_bundle), "--emulate", "cortex-m4"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "cortex-a72" in proc.stderr and "Traceback" not in proc.stderr


def test_near_tie_is_recognised(tiny_bundle):
    import base64

    import numpy as np

    host = greedy_trace(tiny_bundle, tokens=4, threads=1)
    steps = [np.frombuffer(base64.b64decode(s), np.float32).copy() for s in host["logits"]]
    wobble = lambda arrays: [s + np.float32(0.01) * np.abs(s).max() * ((np.arange(s.size) % 3) - 1) for s in arrays]  # noqa: E731
    pack = lambda arrays: [base64.b64encode(a.astype(np.float32).tobytes()).decode() for a in arrays]  # noqa: E731
    tied = [s.copy() for s in steps]
    top = np.argsort(tied[2])[-2:]
    tied[2][top[0]] = tied[2][top[1]] - 0.001 * np.abs(tied[2]).max()  # the host's own choice at step 2 is a near-tie
    host_tied = dict(host, logits=pack(tied))
    parted = host["tokens"][:2] + [int(top[0]), host["tokens"][3]]
    # The other machine: 1% of logit noise, and at step 2 the other of the two nearly tied tokens.
    other_tied = dict(host, tokens=parted, logits=pack(wobble(tied)))
    tied_verdict = compare(host_tied, other_tied, tiny_bundle, "int8")
    assert tied_verdict["first_disagreement_near_tie"] is True and tied_verdict["passed"]
    assert tied_verdict["tolerance"] == 0.02
    assert tied_verdict["max_relative_logit_diff"] == pytest.approx(0.01, rel=0.01)
    assert "2/4 greedy tokens" in tied_verdict["summary"] and "they part at a near-tie" in tied_verdict["summary"]
    # Where the host's choice was clear, parting is a disagreement, whatever the tolerance.
    apart = compare(host, dict(host, tokens=parted, logits=pack(wobble(steps))), tiny_bundle, "int8")
    assert apart["first_disagreement_near_tie"] is False and not apart["passed"]
    # The same traces against fp32's tolerance: a 1% logit difference is refused, with its numbers.
    strict = compare(host_tied, other_tied, tiny_bundle, "fp32")
    assert not strict["passed"]
    assert "largest logit difference 1.000% of the largest logit (tolerance 0.1%)" in strict["summary"]


def test_int8_statistics_under_emulated_cortex_a76(tiny_llama, tiny_profile, tmp_path):
    """The int8 check that decides on ARM: next-token agreement and perplexity against the host
    over the evaluation text, within the profile's int8 budget."""
    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    build(str(tiny_llama), load_profile(str(tiny_profile)), tmp_path / "int8", echo=lambda m: None, precision="int8")
    result = verify(tmp_path / "int8", "cortex-a76", onnxruntime="1.27.0", tokens=4, threads=1, eval_tokens=64)
    stats = result["statistics"]
    assert stats["tokens"] == 64 and stats["budget"] == {"min_top1": 0.96, "max_ppl_difference": 0.015}
    assert stats["top1_agreement"] >= 0.96 and abs(stats["ppl_difference"]) <= 0.015 and result["passed"]


@pytest.mark.skipif(
    not __import__("os").environ.get("EDGE_SLM_SLOW"), reason="slow: set EDGE_SLM_SLOW=1 (make test-slow)"
)
@pytest.mark.parametrize("target,cpu", [("rpi4", "cortex-a72"), ("rpi5", "cortex-a76")])
def test_default_model_pi_bundles_agree_under_emulation(target, cpu):
    """The real default-model bundles (`make rpi4 rpi5` first), 8 greedy tokens and 256 tokens of
    statistics under emulation, about 10 minutes each."""
    from pathlib import Path

    bundle = Path(__file__).resolve().parent.parent / "export" / target
    assert (bundle / "manifest.json").is_file(), f"build it first: make {target}"
    result = verify(bundle, cpu, tokens=8, eval_tokens=256)
    print(target, cpu, {k: v for k, v in result.items() if k not in ("host_tokens", "emulated_tokens")})
    assert result["same_prompt_ids"] and result["statistics"]["passed"] and result["passed"]


def test_an_encoder_is_judged_by_the_gate_its_profile_sets():
    import dataclasses

    from edge_slm.core.targets import load_profile
    from edge_slm.harness.agreement import encoder_agreement

    profile = load_profile("x86-laptop")
    lenient = dataclasses.replace(profile, encoder=dataclasses.replace(profile.encoder, min_label_agreement=0.5))
    host, arm = {"labels": ["a", "b", "c", "d"]}, {"labels": ["a", "b", "c", "x"]}
    verdict = encoder_agreement(host, arm, lenient)
    assert (verdict["passed"], verdict["label_agreement"], verdict["needs"]) == (True, 0.75, 0.5)
    strict = encoder_agreement(host, arm, profile)  # the shipped profile asks 99%
    assert strict["passed"] is False and strict["summary"].endswith(", fewer than the 99% the profile needs")
