"""A bundle run on an emulated Raspberry Pi CPU (qemu-user-static, aarch64 onnxruntime 1.27.0)
against the host: same prompt ids, same greedy tokens, logits within tolerance.
`make test` installs qemu-user-static; the sysroot is prepared once and cached."""

import shutil
import subprocess
import sys

import pytest

from edge_slm.verify import compare, greedy_trace, verify


def test_tiny_bundle_agrees_under_emulated_cortex_a72(tiny_bundle):
    assert shutil.which("qemu-aarch64-static"), "qemu-user-static is not installed: run `make test`, which installs it"
    result = verify(tiny_bundle, "cortex-a72", onnxruntime="1.27.0", tokens=8, threads=1)
    assert result["onnxruntime"] == "1.27.0" and result["cpu"] == "cortex-a72"
    assert result["same_prompt_ids"] and result["tokens_agreeing"] == 8
    assert result["max_relative_logit_diff"] <= 1e-3 and result["passed"]


def test_disagreement_is_reported(tiny_bundle):
    host = greedy_trace(tiny_bundle, tokens=4, threads=1)
    other = dict(host, tokens=host["tokens"][:2] + [host["tokens"][2] + 1, host["tokens"][3]])
    result = compare(host, other, "fp32")
    assert not result["passed"] and result["tokens_agreeing"] == 2 and result["max_relative_logit_diff"] == 0.0
    assert compare(host, dict(host, prompt_ids=[0] + host["prompt_ids"]), "fp32")["same_prompt_ids"] is False


def test_cli_rejects_unknown_cpu(tiny_bundle):
    proc = subprocess.run([sys.executable, "-m", "edge_slm.cli", "verify", str(tiny_bundle), "--emulate", "cortex-m4"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "cortex-a72" in proc.stderr and "Traceback" not in proc.stderr
