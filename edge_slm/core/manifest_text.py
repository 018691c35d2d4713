"""A manifest in a few lines for people (`edge-slm inspect`): one printer per family, and the
printers of the decoder's three quantization records. The records are free-form (each recipe
has its own counts), so these read them by key; everything else comes from the typed manifest."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_slm.core.manifest import DecoderManifest, EncoderManifest, Manifest


def _head(manifest: Manifest, bundle) -> list[str]:
    src = manifest.source
    return [
        f"bundle       {bundle}",
        f"schema       {manifest.schema_version}   created {manifest.created or '?'}",
        f"target       {manifest.target}   precision {manifest.precision}",
        f"source       {src.ref} ({src.kind}, sha256 {(src.sha256 or '')[:16]}…)",
    ]


def _versions(manifest: Manifest) -> str:
    return "versions     " + ", ".join(f"{k} {v}" for k, v in manifest.versions.items())


def decoder_lines(manifest: DecoderManifest, bundle) -> list[str]:
    model, graph, val = manifest.model, manifest.graph, manifest.validation
    return [
        *_head(manifest, bundle),
        f"model        {model.architecture}: {model.num_layers} layers, hidden {model.hidden_size}, "
        f"heads {model.num_heads}/{model.num_kv_heads} kv, vocab {model.vocab_size}, "
        f"{model.parameters / 1e6:.1f}M params, context {model.context_length}",
        f"graph        {graph.kind}, {graph.nodes} nodes, opset {dict(graph.opset)}, IR {graph.ir_version}, "
        f"needs onnxruntime >= {manifest.min_onnxruntime or '?'}",
        "ops          " + ", ".join(f"{k} {v}" for k, v in graph.op_counts.items()),
        f"validation   {'passed' if val.get('passed') else 'NOT RUN'}: max |diff| vs torch logits "
        f"{val.get('max_abs_diff', {}).get('logits', float('nan')):.2e} (tol {val.get('tolerance', {}).get('logits')}), "
        f"present {val.get('max_abs_diff', {}).get('present', float('nan')):.2e}",
        _sampling_line(manifest),
        *quantization_lines(manifest.quantization, manifest.accuracy),
        _versions(manifest),
    ]


def _sampling_line(manifest: DecoderManifest) -> str:
    defaults = manifest.sampling_defaults
    if not defaults:
        return "sampling     none recorded: serve uses OpenAI's defaults for what a request leaves out"
    shown = ", ".join(f"{k} {v:g}" for k, v in defaults.items())
    return f"sampling     {shown} (the model's generation_config: serve's defaults)"


def quantization_lines(quant, acc) -> list[str]:
    if not quant:
        return ["quantize     none (fp32 reference)"]
    r, c = quant["recipe"], quant["counts"]
    method = quant.get("method", "weight-only-blockwise")
    if method == "fp16":
        lines = [
            f"quantize     fp16: {c['float16_initializers']} weight tensors float16, KV cache "
            f"{c['kv_cache_dtype']}, logits {c['logits_dtype']}"
        ]
    elif method == "qdq-s8s8-static":
        lines = [
            f"quantize     int8 S8S8 QDQ (TensorRT), static activation scales from {quant['calibration']['file']} "
            f"({c['calibration_tokens']} tokens, percentile {c['percentile']}), SmoothQuant on "
            f"{c['smoothed_activations']} activations",
            f"quantized    {c['quantized_matmuls']} matmuls int8 (per-channel weights, static activations), "
            f"{c.get('float_matmuls', 0)} fp16 (int8 product error > {100 * c['max_error']:g}%: "
            f"{len(c['kept_float_by_error'])} activations; keep_float: {', '.join(r['keep_float']) or 'none'}), "
            f"tied table stored once: {c['shared_embedding_gathers'] == 1}",
        ]
    else:
        lines = _weight_only_lines(r, c)
    return lines + _accuracy_lines(acc)


def _weight_only_lines(r: dict, c: dict) -> list[str]:
    return [
        f"quantize     {r['precision']} weight-only, "
        f"{'symmetric' if r['symmetric'] else 'asymmetric (block minimum as ' + r.get('block_minimum', 'zero_points') + ')'}, blocks of "
        f"{r['block_size']}{' (' + ', '.join(r['block_size_overrides']) + ')' if r.get('block_size_overrides') else ''}, "
        f"accuracy_level {r['accuracy_level']}, embedding {c['embedding_bits']} bits"
        f"{', fp16 scales' if r.get('fp16_scales') else ''}",
        f"quantized    {c['MatMulNBits']} MatMulNBits, {c['GatherBlockQuantized'] + c['dequantized_gathers']} embedding "
        f"gather, {c['float_matmuls_left']} float matmuls left, tied table stored once: {c['shared_tied_embedding']}"
        + (f", {c['block_offset_products']} block-offset products" if c.get("block_offset_products") else "")
        + (
            f", prompts via {c['prefill_graph']} (accuracy_level {r.get('prefill_accuracy_level')})"
            if c.get("prefill_graph")
            else ""
        ),
        *(
            [
                f"smoothing    SmoothQuant on {c['smoothing']['smoothed_activations']} of {c['smoothing']['activations']} "
                f"activations, strengths {r['smooth_alphas']}, {c['smoothing']['calibration_tokens']} calibration tokens"
            ]
            if c.get("smoothing")
            else []
        ),
    ]


def _accuracy_lines(acc: dict | None) -> list[str]:
    lines = []
    if acc:
        budget = acc.get("budget") or {}
        verdict = {
            True: "within budget",
            False: "OUTSIDE budget (built with --allow-accuracy-loss)",
            None: "no budget",
        }[acc["passed"]]
        lines.append(
            f"accuracy     perplexity {acc['perplexity']:.3f} vs fp32 {acc['reference_perplexity']:.3f} "
            f"({100 * acc['ppl_increase']:+.2f}%, budget +{100 * budget.get('max_ppl_increase', float('nan')):.1f}%), "
            f"top-1 {100 * acc['top1_agreement']:.1f}% (budget {100 * budget.get('min_top1', 0):.0f}%), "
            f"KL {acc['mean_kl']:.4f} on {acc['tokens']} tokens: {verdict}"
        )
    return lines


def encoder_lines(manifest: EncoderManifest, bundle) -> list[str]:
    model, graph, val, quant, acc = (
        manifest.model,
        manifest.graph,
        manifest.validation,
        manifest.quantization,
        manifest.accuracy,
    )
    labels = f", labels {', '.join(model.labels)}" if model.labels else ""
    lines = [
        *_head(manifest, bundle),
        f"model        {model.architecture} encoder, {model.task}: {model.num_layers} layers, hidden "
        f"{model.hidden_size}, heads {model.num_heads}, vocab {model.vocab_size}, "
        f"{model.parameters / 1e6:.1f}M params, up to {model.max_sequence_length} tokens",
        f"output       {graph.output} [batch, {model.output_dim}] ({model.pooling} pooling"
        f"{', L2-normalized' if model.normalize else ''}{labels})",
        f"graph        {graph.nodes} nodes, opset {dict(graph.opset)}, IR {graph.ir_version}, "
        f"needs onnxruntime >= {manifest.min_onnxruntime or '?'}",
        "ops          " + ", ".join(f"{k} {v}" for k, v in graph.op_counts.items()),
        f"validation   max |diff| vs torch {val.get('max_abs_diff', float('nan')):.2e} "
        f"(tol {val.get('tolerance')}) on padded batches",
        f"quantize     {quant['method']}" if quant else "quantize     none (fp32 reference)",
    ]
    if acc:
        verdict = "within budget" if acc["passed"] else "OUTSIDE budget (built with --allow-accuracy-loss)"
        if model.task == "classification":
            measured = f"labels agree with fp32 on {100 * acc['label_agreement']:.1f}% of {acc['texts']} texts"
            if "accuracy" in acc:
                measured += f", accuracy {100 * acc['accuracy']:.1f}% vs fp32 {100 * acc['reference_accuracy']:.1f}%"
        else:
            measured = (
                f"mean cosine to fp32 {acc['mean_cosine']:.4f}, same top-1 passage "
                f"{100 * acc['retrieval_agreement']:.1f}%, recall@1 {100 * acc['recall_at_1']:.1f}%"
            )
        lines.append(f"accuracy     {measured}: {verdict}")
    lines.append(_versions(manifest))
    return lines


def seq2seq_lines(manifest, bundle) -> list[str]:
    model, graph, val, quant, acc = (
        manifest.model,
        manifest.graph,
        manifest.validation,
        manifest.quantization,
        manifest.accuracy,
    )
    codes = sorted(k for k in manifest.generation.target_languages if k)
    languages = ", ".join(codes) or "one"
    if len(codes) > 12:  # M2M100 has 100, NLLB 202: a count and the first few
        languages = f"{len(codes)} ({', '.join(codes[:8])}, ...)"
    if manifest.generation.forced_bos and codes:
        languages += " as the decoder's first token"
    lines = [
        *_head(manifest, bundle),
        f"model        {model.architecture} ({model.model_type}) seq2seq: {model.encoder_layers}+{model.decoder_layers} "
        f"layers, hidden {model.hidden_size}, heads {model.num_heads}, vocab {model.vocab_size}, "
        f"{model.parameters / 1e6:.1f}M params, up to {model.max_source_tokens} source tokens",
        f"graphs       {graph.file} + {graph.decoder_file}: {graph.nodes} nodes, needs onnxruntime >= "
        f"{manifest.min_onnxruntime or '?'}; target languages: {languages}",
        f"validation   max |diff| vs torch: encoder {val.get('encoder_max_abs_diff', float('nan')):.2e}, decoder "
        f"logits {val.get('decoder_logits_max_abs_diff', float('nan')):.2e} (tol {val.get('tolerance')})",
        f"quantize     {quant['method']}" if quant else "quantize     none (fp32 reference)",
    ]
    if acc:
        verdict = "within budget" if acc["passed"] else "OUTSIDE budget (built with --allow-accuracy-loss)"
        figures = f"chrF vs fp32 {acc['chrf_vs_fp32']:.1f}"
        if "bleu_vs_fp32" in acc:  # bundles built before the gate scored BLEU record chrF only
            figures += f", BLEU {acc['bleu_vs_fp32']:.1f}, {100 * acc['identical_share']:.0f}% identical"
        lines.append(f"accuracy     {figures} on {acc['texts']} sentences: {verdict}")
    lines.append(_versions(manifest))
    return lines
