"""What an onnxruntime session costs in memory for a bundle's graph, and for two variants of its
tied LM head: the steady RSS after loading and the peak during it, each in a fresh process.

    .venv/bin/python benchmarks/session_memory.py export/x86-laptop [export/x86-laptop-int4 ...] \
        --out benchmarks/session-memory/vm.jsonl

Variants (written to a temporary folder, never into the bundle):
  as built          the bundle's graph
  untied            the LM head reads its own copy of the quantized table (the file grows by it)
  untied, head 1st  that, with the LM head's node first in the node list: onnxruntime packs weights
                    in node order, so this shows what packing order does to the peak. Such a graph
                    is not topologically sorted (the ONNX standard requires it; onnxruntime loads
                    it anyway), so it is a measurement, not something edge-slm ships.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_slm.core.worker import run_worker  # noqa: E402
from edge_slm.runtime.bench import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def session_cost(graph: str) -> dict:
    """RSS growth while onnxruntime opens `graph`: run in a fresh interpreter (the worker protocol),
    so that nothing else has grown the heap."""
    import onnxruntime as ort

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

    before = status("VmRSS")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    return {"steady_mb": status("VmRSS") - before, "peak_mb": status("VmHWM") - before}


def untied(graph: Path, out_dir: Path, head_first: bool) -> Path:
    """A copy of `graph` whose LM head MatMulNBits reads its own copy of the table it shares."""
    import onnx

    proto = onnx.load(str(graph))
    gathers = {n.input[0] for n in proto.graph.node if n.op_type.startswith("Gather")}
    head = next(n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.input[1] in gathers)
    table = next(i for i in proto.graph.initializer if i.name == head.input[1])
    copy = onnx.TensorProto()
    copy.CopyFrom(table)
    copy.name = "lm_head.untied.data"
    proto.graph.initializer.append(copy)
    head.input[1] = copy.name
    if head_first:
        nodes = [head, *(n for n in proto.graph.node if n is not head)]
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    out_dir.mkdir(parents=True)
    onnx.save_model(proto, str(out_dir / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return out_dir / "model.onnx"


def measure(graph: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cost = run_worker("benchmarks.session_memory:session_cost", {"graph": str(graph)}, env=env, what=str(graph))
    data = graph.with_name(graph.name + ".data")
    return {**cost, "weights_mb": data.stat().st_size / 1e6 if data.exists() else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="append one JSON record per bundle and variant")
    args = parser.parse_args()
    host = machine()
    for bundle in args.bundles:
        with tempfile.TemporaryDirectory() as scratch:
            variants = {
                "as built": bundle / "model.onnx",
                "untied": untied(bundle / "model.onnx", Path(scratch) / "untied", head_first=False),
                "untied, head first": untied(bundle / "model.onnx", Path(scratch) / "first", head_first=True),
            }
            for name, graph in variants.items():
                got = measure(graph)
                print(
                    f"{bundle.name:24s} {name:20s} weights {got['weights_mb']:6.1f} MB  session steady "
                    f"+{got['steady_mb']:.0f} MB, peak +{got['peak_mb']:.0f} MB"
                )
                if args.out:
                    record = {
                        "benchmark": "session-memory",
                        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "bundle": str(bundle),
                        "variant": name,
                        "machine": host,
                        **got,
                    }
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    with args.out.open("a") as f:
                        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
