"""The `edge-slm` command line: parse, call one library function, print.

    edge-slm targets [--json]
    edge-slm build --target NAME|FILE [--model REF] [--out DIR] [--precision P] [--allow-accuracy-loss]
                   [--calibration FILE]
    edge-slm prune --model M --out DIR [--ffn R] [--head-groups N] [--layers N] [--recover-steps N]
    edge-slm inspect BUNDLE [--json] [--no-checksums]
    edge-slm generate BUNDLE PROMPT [--chat] [--max-new-tokens N] [--temperature T] ... [--json]
    edge-slm chat BUNDLE
    edge-slm eval BUNDLE --text FILE [--reference BUNDLE] [--json]
    edge-slm bench BUNDLE [--threads 1,2] [--prompt-tokens 128] [--gen-tokens 64] [--out FILE.jsonl]
    edge-slm report RESULTS.jsonl... --out DIR
    edge-slm verify BUNDLE --emulate cortex-a72|cortex-a76 [--onnxruntime VERSION]

Errors are one line on stderr and exit code 2; `edge-slm --debug ...` shows the traceback.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from .errors import EdgeSlmError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="edge-slm")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Build small language models into ONNX bundles for edge devices, and run them there."""
    ctx.obj = {"debug": debug}


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def targets(as_json: bool) -> None:
    """List the target profiles."""
    from .targets import known_targets, load_profile

    profiles = [load_profile(name) for name in known_targets()]
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in profiles], indent=2))
        return
    for p in profiles:
        click.echo(f"{p.name:<12} {p.device.arch:<8} {p.quantize.precision:<5} "
                   f"{','.join(p.runtime.execution_providers):<55} {p.description}")


@cli.command()
@click.option("--target", "-t", required=True, help="Target name (see `edge-slm targets`) or a .toml profile.")
@click.option("--model", "-m", default=None, help="smollm2-135m (default), a .gguf file, a HF model dir, or a hub id.")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None, help="Bundle directory [export/<target>].")
@click.option("--precision", "-p", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default=None,
              help="Override the profile's precision.")
@click.option("--allow-accuracy-loss", is_flag=True, help="Publish the bundle even if it misses its accuracy budget.")
@click.option("--calibration", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Calibration text for static int8 (QDQ) [edge_slm/data/calibration.txt].")
def build(target: str, model: str | None, out: Path | None, precision: str | None, allow_accuracy_loss: bool,
          calibration: Path | None) -> None:
    """Build, validate and bundle a model for one target."""
    from .targets import load_profile

    profile = load_profile(target)  # fail fast, before the heavy imports
    if calibration is not None and not calibration.is_file():
        raise EdgeSlmError(f"--calibration {calibration}: no such file; pass a UTF-8 text file")
    from .bundle import check_output_dir

    out = out or Path("export") / profile.name
    check_output_dir(out, source=Path(model) if model and Path(model).exists() else None)
    from .pipeline import build as run_build

    manifest = run_build(model, profile, out, echo=_echo_err, precision=precision,
                         allow_accuracy_loss=allow_accuracy_loss, calibration=calibration)
    size = sum(f["bytes"] for f in manifest["files"].values()) / 1e6
    checked = "validated against torch" + (", accuracy gate passed" if (manifest.get("accuracy") or {}).get("passed") else "")
    click.echo(f"bundle ready: {out}  ({manifest['precision']}, {size:.0f} MB, {checked})")
    click.echo(f"inspect it:   edge-slm inspect {out}")
    click.echo(f"run it:       edge-slm generate {out} \"What is the capital of France?\" --chat")


@cli.command()
@click.option("--model", "-m", default=None, help="smollm2-135m (default), a .gguf file or a HF model dir.")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Output model directory.")
@click.option("--ffn", type=float, default=0.0, help="Share of FFN channels to remove in every layer (0.25 keeps 75%).")
@click.option("--head-groups", type=int, default=0, help="Whole GQA groups (a key/value head and its query heads) to remove per layer.")
@click.option("--layers", type=int, default=0, help="Whole decoder layers to remove (those that change their input least).")
@click.option("--calibration", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Text that importance scores and recovery use [edge_slm/data/calibration.txt].")
@click.option("--recover-steps", type=int, default=0, help="Knowledge-distillation steps from the unpruned model (0: none).")
@click.option("--recover-minutes", type=float, default=0.0, help="Stop recovery after this many minutes (0: no limit).")
@click.option("--no-compensate", is_flag=True, help="Do not refit the output projections on the remaining channels.")
@click.option("--sparsity", type=float, default=0.0,
              help="Zero this share of each matrix's weights (Wanda scores): smaller compressed files, no speed.")
@click.option("--sparsity-pattern", type=click.Choice(["unstructured", "2:4"]), default="unstructured")
def prune(model: str | None, out: Path, ffn: float, head_groups: int, layers: int, calibration: Path | None,
          recover_steps: int, recover_minutes: float, no_compensate: bool, sparsity: float, sparsity_pattern: str) -> None:
    """Remove layers, attention groups and FFN channels; optionally distil back; write a HF model dir."""
    from .prune import PruneSettings, prune_directory
    from .recover import RecoverySettings

    if calibration is not None and not calibration.is_file():
        raise EdgeSlmError(f"--calibration {calibration}: no such file; pass a UTF-8 text file")
    if recover_steps < 0 or recover_minutes < 0:
        raise EdgeSlmError("--recover-steps and --recover-minutes must be 0 or more")
    if sparsity_pattern == "2:4" and not sparsity:
        sparsity = 0.5
    settings = PruneSettings(ffn=ffn, head_groups=head_groups, layers=layers, compensate=not no_compensate,
                             sparsity=sparsity, sparsity_pattern=sparsity_pattern)
    if not (ffn or head_groups or layers or sparsity):
        raise EdgeSlmError("nothing to prune: pass --ffn, --head-groups, --layers and/or --sparsity")
    recovery = RecoverySettings(steps=recover_steps, time_budget_s=60 * recover_minutes) if recover_steps else None
    record = prune_directory(model, settings, out, calibration, recovery, progress=_echo_err)
    ppl = record["perplexity"]
    click.echo(f"pruned model: {out}  ({record['parameters_before'] / 1e6:.1f}M -> {record['parameters_after'] / 1e6:.1f}M "
               f"parameters; perplexity {ppl['before']:.2f} -> {ppl['pruned']:.2f}"
               + (f" -> {ppl['recovered']:.2f} after recovery" if "recovered" in ppl else "") + ")")
    if record.get("sparsity"):
        sp = record["sparsity"]
        click.echo(f"sparsity:     {100 * sp['sparsity']:.1f}% zeros ({sp['pattern']}); decoder weights compressed "
                   f"{sp['zlib_bytes_dense'] / 1e6:.0f} MB -> {sp['zlib_bytes_sparse'] / 1e6:.0f} MB (zlib); "
                   "no speed: the runtimes' CPU kernels are dense")
    click.echo(f"build it:     edge-slm build --target x86-laptop --model {out} --out export/x86-laptop-pruned")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--no-checksums", is_flag=True, help="Check sizes only (fast), not sha256.")
def inspect(bundle: Path, as_json: bool, no_checksums: bool) -> None:
    """Show a bundle's manifest and verify every file's checksum."""
    from .bundle import verify_bundle

    manifest = verify_bundle(bundle, checksums=not no_checksums)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    model, graph, val = manifest["model"], manifest["graph"], manifest.get("validation", {})
    src = manifest["source"]
    lines = [
        f"bundle       {bundle}",
        f"schema       {manifest['schema_version']}   created {manifest.get('created', '?')}",
        f"target       {manifest['target']}   precision {manifest['precision']}",
        f"source       {src.get('ref')} ({src.get('kind')}, sha256 {src.get('sha256', '')[:16]}…)",
        f"model        {model['architecture']}: {model['num_layers']} layers, hidden {model['hidden_size']}, "
        f"heads {model['num_heads']}/{model['num_kv_heads']} kv, vocab {model['vocab_size']}, "
        f"{model['parameters'] / 1e6:.1f}M params, context {model['context_length']}",
        f"graph        {graph['kind']}, {graph['nodes']} nodes, opset {graph['opset']}, IR {graph['ir_version']}, "
        f"needs onnxruntime >= {manifest.get('min_onnxruntime', '?')}",
        f"ops          " + ", ".join(f"{k} {v}" for k, v in graph["op_counts"].items()),
        f"validation   {'passed' if val.get('passed') else 'NOT RUN'}: max |diff| vs torch logits "
        f"{val.get('max_abs_diff', {}).get('logits', float('nan')):.2e} (tol {val.get('tolerance', {}).get('logits')}), "
        f"present {val.get('max_abs_diff', {}).get('present', float('nan')):.2e}",
        *_quantization_lines(manifest),
        f"versions     " + ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items()),
        "files",
    ]
    for name, info in manifest["files"].items():
        lines.append(f"  {name:<22} {info['bytes'] / 1e6:>9.2f} MB  sha256 {info['sha256'][:16]}…  "
                     f"{'size ok' if no_checksums else 'ok'}")
    click.echo("\n".join(lines))
    click.echo("sizes verified" if no_checksums else "all checksums verified")


def _quantization_lines(manifest: dict) -> list[str]:
    quant, acc = manifest.get("quantization"), manifest.get("accuracy")
    if not quant:
        return ["quantize     none (fp32 reference)"]
    r, c = quant["recipe"], quant["counts"]
    method = quant.get("method", "weight-only-blockwise")
    if method == "fp16":
        lines = [f"quantize     fp16: {c['float16_initializers']} weight tensors float16, KV cache "
                 f"{c['kv_cache_dtype']}, logits {c['logits_dtype']}"]
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
        + (f", prompts via {c['prefill_graph']} (accuracy_level {r.get('prefill_accuracy_level')})"
           if c.get("prefill_graph") else ""),
        *([f"smoothing    SmoothQuant on {c['smoothing']['smoothed_activations']} of {c['smoothing']['activations']} "
           f"activations, strengths {r['smooth_alphas']}, {c['smoothing']['calibration_tokens']} calibration tokens"]
          if c.get("smoothing") else []),
    ]


def _accuracy_lines(acc: dict | None) -> list[str]:
    lines = []
    if acc:
        budget = acc.get("budget") or {}
        verdict = {True: "within budget", False: "OUTSIDE budget (built with --allow-accuracy-loss)", None: "no budget"}[acc["passed"]]
        lines.append(
            f"accuracy     perplexity {acc['perplexity']:.3f} vs fp32 {acc['reference_perplexity']:.3f} "
            f"({100 * acc['ppl_increase']:+.2f}%, budget +{100 * budget.get('max_ppl_increase', float('nan')):.1f}%), "
            f"top-1 {100 * acc['top1_agreement']:.1f}% (budget {100 * budget.get('min_top1', 0):.0f}%), "
            f"KL {acc['mean_kl']:.4f} on {acc['tokens']} tokens: {verdict}")
    return lines


def _sampling_options(func):
    for option in reversed([
        click.option("--max-new-tokens", "-n", type=int, default=128, show_default=True),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 is no limit."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
        click.option("--seed", type=int, default=None, help="Makes sampling reproducible."),
        click.option("--stop", multiple=True, help="Stop when this text appears (repeatable)."),
        click.option("--threads", type=int, default=None, help="CPU threads [the bundle's profile]."),
    ]):
        func = option(func)
    return func


def _open(bundle: Path, threads: int | None):
    from . import runtime

    return runtime.load(bundle, threads=threads)


def _sampling(kw: dict) -> dict:
    return {k: kw[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty", "seed")}


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt")
@_sampling_options
@click.option("--chat", "as_chat", is_flag=True, help="Wrap the prompt as a user message with the chat template.")
@click.option("--truncate", is_flag=True, help="Keep the end of a prompt longer than the context.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with ids, text and timings.")
def generate(bundle: Path, prompt: str, as_chat: bool, truncate: bool, as_json: bool, **kw) -> None:
    """Generate text from PROMPT, streamed to the terminal."""
    from .runtime import Generation

    if kw["threads"] is not None and kw["threads"] < 1:
        raise click.UsageError(f"--threads is {kw['threads']}; use 1 or more")
    model = _open(bundle, kw["threads"])
    result = Generation(prompt_token_ids=[])
    pieces = model.stream(prompt, max_new_tokens=kw["max_new_tokens"], chat=as_chat, stop=kw["stop"],
                          truncate=truncate, result=result, **_sampling(kw))
    if as_json:
        for _ in pieces:
            pass
        click.echo(json.dumps(result.to_dict()))
        return
    for piece in pieces:
        click.echo(piece, nl=False)
    click.echo()
    if result.stop_reason == "context_full":
        _echo_err(f"[stopped: the context of {model.context_length} tokens is full]")
    _echo_err(f"[{len(result.token_ids)} tokens, first after {result.ttft_ms:.0f} ms, "
              f"{result.decode_tokens_per_s:.1f} tok/s, stop: {result.stop_reason}]")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@_sampling_options
@click.option("--system", default=None, help="A system message for the conversation.")
def chat(bundle: Path, system: str | None, **kw) -> None:
    """Talk with the model; earlier turns stay in the KV cache. /reset starts over, /exit leaves."""
    if kw["threads"] is not None and kw["threads"] < 1:
        raise click.UsageError(f"--threads is {kw['threads']}; use 1 or more")
    model = _open(bundle, kw["threads"])
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    _echo_err(f"chatting with {bundle} ({model.manifest['precision']}); /reset to start over, /exit to leave")
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = list(start)
            model.session.reset()
            _echo_err("[conversation reset]")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        result = model.chat(messages, max_new_tokens=kw["max_new_tokens"], stop=kw["stop"], **_sampling(kw))
        click.echo(result.text)
        _echo_err(f"[{len(result.prompt_token_ids)} prompt tokens, {result.reused_tokens} from the cache; "
                  f"{len(result.token_ids)} generated, {result.decode_tokens_per_s:.1f} tok/s]")
        messages.append({"role": "assistant", "content": result.text})


@cli.command(name="eval")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path), help="UTF-8 text to score.")
@click.option("--reference", type=click.Path(path_type=Path), default=None, help="Usually the fp32 bundle.")
@click.option("--window", type=int, default=None, help="Tokens per window [the bundle's context length].")
@click.option("--threads", type=int, default=None)
@click.option("--json", "as_json", is_flag=True)
def eval_command(bundle: Path, text_file: Path, reference: Path | None, window: int | None,
                 threads: int | None, as_json: bool) -> None:
    """Perplexity over a text; with --reference, top-1 agreement and mean KL divergence."""
    from .runtime.evaluate import evaluate, read_text

    if threads is not None and threads < 1:
        raise click.UsageError(f"--threads is {threads}; use 1 or more")
    text = read_text(text_file)
    model = _open(bundle, threads)
    ref_model = _open(reference, threads) if reference else None
    result = evaluate(model, text, ref_model, window,
                      progress=lambda done, total: _echo_err(f"  window {done}/{total}"))
    if as_json:
        click.echo(json.dumps(result))
        return
    line = f"perplexity {result['perplexity']:.3f} over {result['scored_tokens']} tokens ({result['windows']} windows)"
    if ref_model:
        line += f"; top-1 agreement {result['top1_agreement']:.1%}, mean KL {result['mean_kl']:.4f}"
    click.echo(line)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path), required=False)
@click.option("--prompt-tokens", type=int, default=128, show_default=True)
@click.option("--gen-tokens", type=int, default=64, show_default=True)
@click.option("--repetitions", "-r", type=int, default=5, show_default=True)
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--threads", default=None, help="Thread counts to sweep, e.g. 1,2 [the bundle's profile].")
@click.option("--reference", type=click.Path(path_type=Path), default=None, help="fp32 bundle for top-1 agreement.")
@click.option("--no-accuracy", is_flag=True, help="Skip the perplexity run.")
@click.option("--host", default=None, help="Run on this device over SSH (user@host).")
@click.option("--port", type=int, default=22, show_default=True, help="SSH port of --host.")
@click.option("--identity", default=None, help="SSH private key for --host.")
@click.option("--remote-python", default="python3", show_default=True, help="Python on --host.")
@click.option("--inventory", type=click.Path(path_type=Path), default=None,
              help="TOML file of [[device]] host/bundle/target entries, benchmarked in parallel.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Append the records to this JSONL file.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON lines.")
def bench(bundle: Path | None, prompt_tokens: int, gen_tokens: int, repetitions: int, warmup: int, threads: str | None,
          reference: Path | None, no_accuracy: bool, host: str | None, port: int, identity: str | None,
          remote_python: str, inventory: Path | None, out: Path | None, as_json: bool) -> None:
    """Measure load, first token, prefill and decode speed, latency, memory and accuracy."""
    from .bench import run, table

    if threads is not None:
        try:
            counts = [int(t) for t in threads.split(",")]
        except ValueError:
            raise click.UsageError(f"--threads {threads!r}: give counts like 1,2,4") from None
        if min(counts) < 1:
            raise click.UsageError(f"--threads {threads}: every count must be 1 or more")
    if repetitions < 1 or warmup < 0 or prompt_tokens < 1 or gen_tokens < 2:
        raise click.UsageError("--repetitions must be at least 1, --gen-tokens at least 2, --warmup 0 or more")
    if bundle is None and inventory is None:
        raise click.UsageError("give a BUNDLE (or --inventory FILE)")
    failures = {}
    if host or inventory:
        from .remote import Device, bench_inventory, bench_remote, read_inventory

        if reference:
            raise click.UsageError("--reference works on this machine only; run `edge-slm eval` on the device for top-1")
        args = ["--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(gen_tokens), "-r", str(repetitions),
                "--warmup", str(warmup)] + (["--threads", threads] if threads else []) + (["--no-accuracy"] if no_accuracy else [])
        if inventory:
            records, failures = bench_inventory(read_inventory(inventory), args, progress=_echo_err)
        else:
            records = bench_remote(Device(host, port, identity, remote_python), bundle, args, progress=_echo_err)
    else:
        from .bundle import read_manifest

        counts = counts if threads else [int(read_manifest(bundle)["profile"]["runtime"]["threads"])]
        records = run(bundle, counts, prompt_tokens, gen_tokens, repetitions, warmup, reference,
                      accuracy=not no_accuracy, progress=_echo_err)
    if out and records:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        _echo_err(f"appended {len(records)} records to {out}")
    if as_json:
        for record in records:
            click.echo(json.dumps(record))
    elif records:
        click.echo(table(records))
    for where, why in failures.items():
        _echo_err(f"error: {why}")
    if failures:
        sys.exit(2)


@cli.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for report.md, report.html, PNGs.")
def report(results: tuple[Path, ...], out: Path) -> None:
    """Markdown and HTML reports with plots from benchmark records (JSONL)."""
    from .report import write_report

    paths = write_report(list(results), out)
    for path in paths:
        click.echo(str(path))


@cli.command(name="verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--emulate", required=True, type=click.Choice(["cortex-a72", "cortex-a76"]),
              help="cortex-a72 is the Raspberry Pi 4, cortex-a76 the Raspberry Pi 5.")
@click.option("--onnxruntime", "ort_version", default=None, help="aarch64 onnxruntime to use [newest in the profile].")
@click.option("--tokens", type=int, default=8, show_default=True, help="Greedy tokens to compare.")
@click.option("--eval-tokens", type=int, default=0, show_default=True,
              help="Also compare next-token statistics over this many tokens of eval.txt (int8: what decides).")
@click.option("--json", "as_json", is_flag=True)
def verify_command(bundle: Path, emulate: str, ort_version: str | None, tokens: int, eval_tokens: int,
                   as_json: bool) -> None:
    """Run the bundle on an emulated Raspberry Pi CPU (qemu) and compare it with this machine."""
    from .verify import verify

    result = verify(bundle, emulate, ort_version, tokens, progress=_echo_err, eval_tokens=eval_tokens)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{'PASSED' if result['passed'] else 'FAILED'}: {result['device']} ({result['cpu']}, emulated), "
                   f"onnxruntime {result['onnxruntime']} aarch64 vs host {result['host_onnxruntime']}")
        click.echo(f"  prompt ids identical: {result['same_prompt_ids']}; greedy tokens agreeing: "
                   f"{result['tokens_agreeing']}/{result['tokens']}; max logit difference "
                   f"{100 * result['max_relative_logit_diff']:.3f}% of the largest logit (tolerance {100 * result['tolerance']:.1f}%)")
        click.echo(f"  emulated text: {result['text']!r}; first token {result['emulated_first_token_s']:.1f} s, "
                   f"{result['emulated_seconds']:.0f} s in all under emulation")
        if "statistics" in result:
            st = result["statistics"]
            click.echo(f"  over {st['tokens']} tokens of eval.txt: next-token agreement {100 * st['top1_agreement']:.1f}% "
                       f"(needs {100 * st['budget']['min_top1']:.0f}%), perplexity {st['perplexity_emulated']:.3f} emulated "
                       f"vs {st['perplexity_host']:.3f} host ({100 * st['ppl_difference']:+.2f}%, allowed "
                       f"±{100 * st['budget']['max_ppl_difference']:.1f}%)"
                       + ("; greedy tokens part at a near-tie" if result.get("first_disagreement_near_tie") else ""))
    if not result["passed"]:
        sys.exit(1)


def _interrupt(signum, frame) -> None:
    # SIGTERM / SIGHUP (a closed terminal, `kill`, a CI timeout) unwind like Ctrl-C, so that a
    # build removes its staging and scratch directories instead of leaving hundreds of MB behind.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if argv is None:  # the command itself, not a caller's process
        for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if signum is not None:
                signal.signal(signum, _interrupt)
    try:
        cli.main(args=args, prog_name="edge-slm", standalone_mode=False)
    except EdgeSlmError as exc:
        if debug:
            raise
        _echo_err(f"error: {exc}")
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        _echo_err("interrupted: nothing was published (the previous bundle, if any, is intact)"
                  if {"build", "prune"} & set(args) else "interrupted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except Exception as exc:  # an unexpected failure: still one line unless --debug
        if debug:
            raise
        _echo_err(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()
