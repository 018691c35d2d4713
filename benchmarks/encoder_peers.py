"""edge-slm's encoder bundles side by side with the peers, on the same all-MiniLM-L6-v2 weights,
the same texts, the same thread count, each run in a fresh process, rounds alternating:

    .venv/bin/python benchmarks/encoder_peers.py --bundle export/x86-laptop-embedder \
        --bundle export/x86-laptop-embedder-fp32 --rounds 3 --out benchmarks/results/encoders/HOST.jsonl

Peers: sentence-transformers on torch (fp32) and on its ONNX backend (fp32, and its AVX2 int8
export), optimum's ORTModelForFeatureExtraction (fp32, and its own AVX2 dynamic int8 quantizer),
and fastembed pointed at a local ONNX export (it otherwise downloads from a hub). Every system is
timed by `edge_slm.runtime.bench_encoder.encoder_timings` (text in, normalized vector out), and
written as records of the bench schema, so `edge-slm report` shows them. Needs
`pip install sentence-transformers fastembed`; not part of the default install or CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from edge_slm.core.errors import EdgeSlmError
from edge_slm.core.worker import run_worker

REPO = Path(__file__).resolve().parent.parent  # the peers' worker imports benchmarks.encoder_peers from here

PEERS = ("st-torch", "st-onnx", "st-onnx-int8", "optimum", "optimum-int8", "fastembed")
PRECISION = {
    "st-torch": "fp32",
    "st-onnx": "fp32",
    "st-onnx-int8": "int8",
    "optimum": "fp32",
    "optimum-int8": "int8",
    "fastembed": "fp32",
}
SYSTEM = {
    "st-torch": "sentence-transformers (torch)",
    "st-onnx": "sentence-transformers (onnx)",
    "st-onnx-int8": "sentence-transformers (onnx int8)",
    "optimum": "optimum (onnxruntime)",
    "optimum-int8": "optimum (onnxruntime int8)",
    "fastembed": "fastembed",
}


def prepare(work: Path) -> dict:
    """Each peer's model files, made once from the packaged model (no hub)."""
    from edge_slm.builder.encoder.source import default_encoder_dir

    paths = {
        "st": work / "st",
        "optimum": work / "optimum",
        "optimum-int8": work / "optimum-int8",
        "fastembed": work / "fastembed",
    }
    if (work / "ready").is_file():
        return {k: str(v) for k, v in paths.items()}
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(default_encoder_dir(), paths["st"])
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    st = SentenceTransformer(str(paths["st"]), backend="onnx", device="cpu")  # exports onnx/model.onnx
    st.save_pretrained(str(paths["st"]))
    export_dynamic_quantized_onnx_model(st, "avx2", str(paths["st"]))  # onnx/model_quint8_avx2.onnx
    ort_model = ORTModelForFeatureExtraction.from_pretrained(str(paths["st"]), subfolder="onnx", file_name="model.onnx")
    ort_model.save_pretrained(str(paths["optimum"]))
    st.tokenizer.save_pretrained(str(paths["optimum"]))
    quantizer = ORTQuantizer.from_pretrained(str(paths["optimum"]))
    quantizer.quantize(AutoQuantizationConfig.avx2(is_static=False, per_channel=True), str(paths["optimum-int8"]))
    st.tokenizer.save_pretrained(str(paths["optimum-int8"]))
    shutil.copytree(paths["optimum"], paths["fastembed"])
    (work / "ready").write_text("ok\n")
    return {k: str(v) for k, v in paths.items()}


def worker(**cfg) -> dict:
    import numpy as np

    from edge_slm.runtime.bench_encoder import encoder_timings, peak_rss_mb

    peer, threads, paths = cfg["peer"], cfg["threads"], cfg["paths"]
    start = time.perf_counter()
    if peer.startswith("st-"):
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        kwargs = {}
        if peer != "st-torch":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            kwargs = {"backend": "onnx", "model_kwargs": {"session_options": options}}
            if peer == "st-onnx-int8":
                kwargs["model_kwargs"]["file_name"] = "onnx/model_quint8_avx2.onnx"
        model = SentenceTransformer(paths["st"], device="cpu", **kwargs)
        tokenizer = model.tokenizer

        def encode(texts, batch):
            return model.encode(texts, batch_size=batch, normalize_embeddings=True)
    elif peer.startswith("optimum"):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForFeatureExtraction
        from transformers import AutoTokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        directory = paths[peer]
        files = sorted(p.name for p in Path(directory).glob("*.onnx"))
        model = ORTModelForFeatureExtraction.from_pretrained(directory, file_name=files[0], session_options=options)
        tokenizer = AutoTokenizer.from_pretrained(directory)

        def encode(texts, batch):
            rows = []
            for first in range(0, len(texts), batch):
                inputs = tokenizer(
                    texts[first : first + batch], padding=True, truncation=True, max_length=256, return_tensors="np"
                )
                hidden = model(**inputs).last_hidden_state
                mask = inputs["attention_mask"][..., None].astype(np.float32)
                pooled = (hidden * mask).sum(1) / mask.sum(1)
                rows.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
            return np.concatenate(rows)
    else:
        from fastembed import TextEmbedding
        from transformers import AutoTokenizer

        model = TextEmbedding(
            "sentence-transformers/all-MiniLM-L6-v2", specific_model_path=paths["fastembed"], threads=threads
        )
        tokenizer = AutoTokenizer.from_pretrained(paths["fastembed"])

        def encode(texts, batch):
            return np.stack(list(model.embed(texts, batch_size=batch)))

    load_s = time.perf_counter() - start
    timings = encoder_timings(encode, lambda text: len(tokenizer(text).input_ids), cfg["repetitions"], cfg["warmup"])
    vectors = encode(cfg["check_texts"], 8)
    return {"load_s": load_s, **timings, "peak_rss_mb": peak_rss_mb(), "check_vectors": np.asarray(vectors).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", action="append", default=[], help="edge-slm embedder bundles to run alongside.")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--target", default="x86-laptop")
    parser.add_argument("--work", default=str(Path.home() / ".cache/edge-slm/peers/minilm"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import numpy as np

    from edge_slm import runtime
    from edge_slm.core.labelled import read_retrieval
    from edge_slm.runtime.bench import BundleInfo
    from edge_slm.runtime.bench_encoder import encoder_record
    from edge_slm.runtime.bench_results import results_of

    paths = prepare(Path(args.work))
    check = read_retrieval()
    check_texts = check.queries[:20]
    reference = None
    runs = [("edge-slm", b) for b in args.bundle] + [(p, None) for p in args.peers.split(",") if p]
    for round_number in range(args.rounds):
        for system, bundle in runs:
            cfg = {"threads": args.threads, "repetitions": args.repetitions, "warmup": args.warmup}
            if bundle:
                target, cfg = "edge_slm.runtime.bench_encoder:measure_encoder", {"bundle": bundle, **cfg}
            else:
                target = "benchmarks.encoder_peers:worker"
                cfg |= {"peer": system, "paths": paths, "check_texts": check_texts}
            try:
                raw = run_worker(target, cfg, env={**os.environ, "PYTHONPATH": str(REPO)}, what=system)
            except EdgeSlmError as exc:
                sys.exit(str(exc))
            if bundle:
                model = runtime.load(bundle)
                info = BundleInfo.of(Path(bundle), model.manifest, None)
                vectors = model.embed(check_texts)
                name = "edge-slm"
            else:
                vectors = np.array(raw.pop("check_vectors"), dtype=np.float32)
                onnx_files = {
                    "st-onnx": [Path(paths["st"], "onnx", "model.onnx")],
                    "st-onnx-int8": [Path(paths["st"], "onnx", "model_quint8_avx2.onnx")],
                    "optimum-int8": list(Path(paths["optimum-int8"]).glob("*.onnx")),
                }.get(system, list(Path(paths["optimum"]).glob("*.onnx")))
                info = BundleInfo(
                    path=args.work,
                    manifest_sha256=None,
                    target=args.target,
                    precision=PRECISION[system],
                    graph=system,
                    size_bytes=sum(p.stat().st_size for p in onnx_files) if system != "st-torch" else 90_868_376,
                    parameters=22_713_216,
                    family="encoder",
                )
                name = SYSTEM[system]
            if reference is None:
                from sentence_transformers import SentenceTransformer

                reference = SentenceTransformer(paths["st"], device="cpu").encode(
                    check_texts, normalize_embeddings=True
                )
            cosine = float((vectors * reference).sum(1).mean())
            record = encoder_record(
                info,
                args.threads,
                args.repetitions,
                args.warmup,
                raw,
                {"cosine_to_torch_fp32": cosine, "round": round_number + 1},
                system=name,
            )
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            r = results_of(record)
            print(
                f"round {round_number + 1} {name} {info.precision}: b1@16 {r.latency_ms_16.p50:.1f} ms, "
                f"b1@128 {r.latency_ms_128.p50:.1f} ms, b32 {r.texts_per_s_b32.mean:.0f} texts/s, "
                f"peak RSS {r.peak_rss_mb:.0f} MB, cosine to torch {cosine:.4f}",
                file=sys.stderr,
            )


if __name__ == "__main__":
    main()
