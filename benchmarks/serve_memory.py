"""Where the memory of 4 busy slots goes: `BatchDecoder` in one process per run, peak RSS (VmHWM,
/proc) after loading and after 4 prompts decoded together, alternating variants in fresh processes.

    .venv/bin/python benchmarks/serve_memory.py /work/cmp/new-x86 [--rounds 2] [--variants base,arena-off] \
        [--slots 4] [--prompt-tokens 1024] [--gen 16] [--out benchmarks/results/serve/memory-x86.jsonl]

A variant is a process-wide setting applied before the model loads (`VARIANTS`); every run also
records its greedy tokens, and the script fails if a variant's differ from the first variant's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _session_entry(key: str, value: str):
    """A variant that adds one onnxruntime session config entry to every session the runtime opens."""

    def apply():
        import onnxruntime as ort

        from edge_slm.runtime import session

        class Options(ort.SessionOptions):
            def __init__(self):
                super().__init__()
                self.add_session_config_entry(key, value)

        session.ort.SessionOptions = Options

    return apply


def _arena_off():
    import onnxruntime as ort

    from edge_slm.runtime import session

    class Options(ort.SessionOptions):
        def __init__(self):
            super().__init__()
            self.enable_cpu_mem_arena = False

    session.ort.SessionOptions = Options


def _huge_pages():
    """The KV buffer as np.zeros (numpy advises transparent huge pages on arrays of 4 MB or more)."""
    from edge_slm.runtime import batch

    batch.small_page_zeros = lambda shape, dtype: np.zeros(shape, dtype)


def _serve_malloc():
    """What `edge-slm serve` sets before it loads the model (edge_slm/serve/malloc.py)."""
    from edge_slm.serve.malloc import return_large_blocks_to_system

    assert return_large_blocks_to_system()


def _mmap_threshold(kb: int):
    """glibc's mmap threshold fixed at `kb` kB (serve sets 1 MiB)."""

    def apply():
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, kb * 1024)

    return apply


VARIANTS = {
    "serve-malloc": _serve_malloc,
    "mmap-128k": _mmap_threshold(128),
    "mmap-4m": _mmap_threshold(4096),
    "base": lambda: None,
    "huge-pages": _huge_pages,
    "arena-off": _arena_off,
    "no-prepack": _session_entry("session.disable_prepacking", "1"),
    "device-alloc-init": _session_entry("session.use_device_allocator_for_initializers", "1"),
}


def child(args) -> dict:
    """One run in this process: load, 4 prompts at once, `--gen` tokens each; the numbers."""
    VARIANTS[args.variant]()
    from serve_prompt_peers import prompts

    from edge_slm import runtime
    from edge_slm.runtime.batch import BatchDecoder, Sequence

    started = time.perf_counter()
    model = runtime.load(args.bundle, threads=args.threads)
    row = {"load_seconds": time.perf_counter() - started, "loaded_rss_mb": status_mb("VmRSS")}
    texts = prompts(model.tokenizer, args.slots, args.prompt_tokens)
    row["tokenized_rss_mb"] = status_mb("VmRSS")
    decoder = BatchDecoder(model, args.slots, prefill_chunk=args.chunk)
    seqs = [Sequence(model.tokenizer.encode(t, add_special_tokens=False).ids, args.gen) for t in texts]
    tokens: dict[int, list[int]] = {id(s): [] for s in seqs}
    started = time.perf_counter()
    for seq in seqs:
        first = decoder.admit(seq)
        if first is not None:
            tokens[id(seq)].append(first.token)
    first_tokens_at = None
    while decoder.active:
        for seq, response in decoder.step():
            tokens[id(seq)].append(response.token)
        if first_tokens_at is None and all(tokens.values()):
            first_tokens_at = time.perf_counter() - started
    row.update(
        prompts_seconds=first_tokens_at,
        all_seconds=time.perf_counter() - started,
        # After every sequence's first token: the others, 4 at a time (nothing else runs then).
        decode_tokens_per_second=sum(len(t) - 1 for t in tokens.values())
        / (time.perf_counter() - started - first_tokens_at),
        peak_rss_mb=status_mb("VmHWM"),
        rss_now_mb=status_mb("VmRSS"),
        kv_mb=decoder.nbytes / 2**20,
        prompt_tokens=[len(s.prompt_ids) for s in seqs],
        tokens=[tokens[id(s)] for s in seqs],
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="base")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--gen", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # set in the child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    from edge_slm.core.system import cpu_flags, cpu_model

    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}: pick from {', '.join(VARIANTS)}")
    rows = []
    for round_ in range(1, args.rounds + 1):
        order = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
        for variant in order:
            command = [sys.executable, __file__, str(args.bundle), "--variant", variant]
            for name in ("slots", "threads", "chunk", "prompt_tokens", "gen"):
                command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row.update(variant=variant, round=round_)
            rows.append(row)
            shown = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items() if k != "tokens"}
            print(json.dumps(shown), flush=True)
    reference = rows[0]["tokens"]
    differing = sorted({r["variant"] for r in rows if r["tokens"] != reference})
    for variant in variants:
        peaks = [r["peak_rss_mb"] for r in rows if r["variant"] == variant]
        seconds = [r["prompts_seconds"] for r in rows if r["variant"] == variant]
        rates = [r["decode_tokens_per_second"] for r in rows if r["variant"] == variant]
        print(
            f"{variant}: peak RSS {statistics.median(peaks):.0f} MB ({min(peaks):.0f}-{max(peaks):.0f}), "
            f"4 first tokens {statistics.median(seconds):.1f} s ({min(seconds):.1f}-{max(seconds):.1f}), "
            f"then {statistics.median(rates):.1f} tokens/s ({min(rates):.1f}-{max(rates):.1f})"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma"})
        with open(args.out, "a", encoding="utf-8") as handle:
            for row in rows:
                record = {"schema": "edge-slm-serve-memory/1", "bundle": str(args.bundle), **row}
                record.update(cpu=cpu_model(), cpu_flags=flags, load_average_1m=os.getloadavg()[0])
                handle.write(json.dumps(record) + "\n")
    if differing:
        raise SystemExit(f"greedy tokens differ from {rows[0]['variant']}'s in: {', '.join(differing)}")


if __name__ == "__main__":
    main()
