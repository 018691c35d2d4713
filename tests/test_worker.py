"""The worker protocol (`edge_slm.core.worker`) with real interpreters: a result, a refusal as one
line, a crash, a reply that is not a result, a timeout, and a config that survives a shell (ssh)."""

import sys

import pytest

from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.worker import REFUSED, run_worker, worker_command

MISSING = '/no such/it\'s "here" $HOME'  # spaces, quotes and a shell variable: it must arrive as written
MEASURE = {"bundle": MISSING, "threads": 1, "prompt_tokens": 8, "gen_tokens": 2, "repetitions": 1, "warmup": 0}


def test_a_result_comes_back_as_a_dict():
    result = run_worker("edge_slm.core.system:machine", {})
    assert result["cores"] >= 1 and result["python"] == ".".join(map(str, sys.version_info[:3]))


@pytest.mark.parametrize("through", [{}, {"prefix_cmd": ["sh", "-c"], "shell": True}])
def test_a_refusal_is_the_workers_own_line(through):
    """An EdgeSlmError in the worker: its message, whole, after what the caller ran; the same
    through a shell (as over ssh), whose quoting must leave the config as it was."""
    with pytest.raises(EdgeSlmError) as caught:
        run_worker("edge_slm.runtime.bench:measure", MEASURE, what="the benchmark process", **through)
    assert str(caught.value) == (
        f"the benchmark process failed: {MISSING}: no such bundle directory (build one with `edge-slm build`)"
    )


def test_refusal_and_crash_have_distinct_exit_codes():
    import subprocess

    refused = subprocess.run(
        worker_command("edge_slm.runtime.bench:measure", MEASURE), capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == REFUSED and refused.stdout == "" and len(refused.stderr.splitlines()) == 1
    with pytest.raises(
        EdgeSlmError, match=r"^the worker failed: TypeError: .*unexpected keyword argument 'bogus' \(exit code 1\)$"
    ):
        run_worker("edge_slm.core.system:machine", {"bogus": 1})


def test_a_reply_that_is_not_a_result_and_a_timeout():
    with pytest.raises(EdgeSlmError, match=r"^the worker printed float, not a JSON object$"):
        run_worker("edge_slm.core.system:peak_rss_mb", {})
    slow = ["sh", "-c", 'sleep 5; exec "$@"', "sh"]
    with pytest.raises(EdgeSlmError, match=r"^the probe did not finish within 1 s$"):
        run_worker("edge_slm.core.system:machine", {}, prefix_cmd=slow, timeout=1, what="the probe")
    with pytest.raises(EdgeSlmError, match=r"^the probe cannot start: `/nonexistent/python3` is not installed$"):
        run_worker("edge_slm.core.system:machine", {}, python="/nonexistent/python3", what="the probe")
    with pytest.raises(ValueError, match="write package.module:function"):
        run_worker("edge_slm.core.system", {})
