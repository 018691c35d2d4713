"""One protocol for work that runs in another interpreter: a fresh process on this machine (so that
a benchmark's peak memory is its own), the emulated aarch64 Python, a device's Python over SSH, or
a peer's virtual environment.

    python -m edge_slm.core.worker MODULE:FUNCTION 'JSON CONFIG'

The worker imports MODULE, calls FUNCTION(**config) and prints its result as one JSON line (the
last line of stdout). An `EdgeSlmError` (a refusal that names the fix) becomes its message as one
line on stderr and exit code `REFUSED`; any other failure is Python's traceback and exit code 1.
`run_worker()` is the caller's side: the command, the timeout, and one `EdgeSlmError` line with the
worker's last stderr line when it fails. Stdlib only: it runs on every device and in every venv.
"""

from __future__ import annotations

import importlib
import json
import shlex
import subprocess
import sys

from edge_slm.core.errors import EdgeSlmError

REFUSED = 3  # the worker refused its input in one line (an EdgeSlmError), as opposed to crashing (1)


def main(func, argv: list[str] | None = None) -> None:
    """The worker's side: the JSON config argument in, one JSON line out."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        result = func(**json.loads(argv[-1]))
    except EdgeSlmError as exc:
        print(" ".join(str(exc).split("\n")), file=sys.stderr)
        sys.exit(REFUSED)
    print(json.dumps(result))


def worker_command(target: str, config: dict, python: str = sys.executable) -> list[str]:
    """The command that runs `target` ("package.module:function") on `config` with `python`."""
    module, _, function = target.partition(":")
    if not module or not function.isidentifier():
        raise ValueError(f"worker target {target!r}: write package.module:function")
    return [python, "-m", "edge_slm.core.worker", target, json.dumps(config)]


def run_worker(
    target: str,
    config: dict,
    *,
    python: str = sys.executable,
    prefix_cmd: list[str] | None = None,
    shell: bool = False,
    env: dict | None = None,
    timeout: float | None = None,
    what: str = "the worker",
) -> dict:
    """Run `target` on `config` in a fresh interpreter and return its JSON result.

    `prefix_cmd` runs the interpreter through another program (qemu-aarch64-static, or ssh to a
    device); with `shell` that program hands the command to a shell (ssh does), so every word is
    quoted. A failure raises one `EdgeSlmError` line: "<what> failed: <the worker's last stderr line>".
    """
    command = worker_command(target, config, python)
    if shell:
        command = [shlex.join(command)]
    command = [*(prefix_cmd or []), *command]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except FileNotFoundError:
        raise EdgeSlmError(f"{what} cannot start: `{command[0]}` is not installed") from None
    except subprocess.TimeoutExpired:
        raise EdgeSlmError(f"{what} did not finish within {timeout:.0f} s") from None
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1].strip()
        if proc.returncode != REFUSED:
            last += f" (exit code {proc.returncode})"
        raise EdgeSlmError(f"{what} failed: {last}")
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError, RecursionError):
        raise EdgeSlmError(f"{what} printed no result ({(lines or [''])[-1][:80]!r})") from None
    if not isinstance(result, dict):
        raise EdgeSlmError(f"{what} printed {type(result).__name__}, not a JSON object")
    return result


if __name__ == "__main__":  # python -m edge_slm.core.worker MODULE:FUNCTION 'JSON CONFIG'
    if len(sys.argv) != 3 or ":" not in sys.argv[1]:
        sys.exit("usage: python -m edge_slm.core.worker MODULE:FUNCTION 'JSON CONFIG'")
    module_name, _, function_name = sys.argv[1].partition(":")
    main(getattr(importlib.import_module(module_name), function_name), sys.argv[2:])
