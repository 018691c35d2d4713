"""`edge-slm verify BUNDLE --emulate cortex-a72|cortex-a76`: the bundle on an emulated Raspberry Pi CPU
against this machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edge_slm.commands.options import echo_err


@click.command(name="verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--emulate",
    required=True,
    type=click.Choice(["cortex-a72", "cortex-a76"]),
    help="cortex-a72 is the Raspberry Pi 4, cortex-a76 the Raspberry Pi 5.",
)
@click.option("--onnxruntime", "ort_version", default=None, help="aarch64 onnxruntime to use [newest in the profile].")
@click.option("--tokens", type=int, default=8, show_default=True, help="Greedy tokens to compare.")
@click.option(
    "--eval-tokens",
    type=click.IntRange(min=0),
    default=None,
    help="Also compare next-token statistics over this many tokens of eval.txt [256 for quantized bundles, "
    "whose ARM kernels round differently: what decides; 0 for fp32].",
)
@click.option("--json", "as_json", is_flag=True)
def verify_command(
    bundle: Path, emulate: str, ort_version: str | None, tokens: int, eval_tokens: int | None, as_json: bool
) -> None:
    """Run the bundle on an emulated Raspberry Pi CPU (qemu) and compare it with this machine."""
    from edge_slm.commands.translate import refuse_seq2seq
    from edge_slm.core.bundle import read_manifest
    from edge_slm.core.manifest import EncoderManifest
    from edge_slm.harness.emulate import verify, verify_encoder

    refuse_seq2seq(bundle, "verify")
    manifest = read_manifest(bundle)
    if isinstance(manifest, EncoderManifest):
        result = verify_encoder(bundle, emulate, ort_version, 2, echo_err)
        if as_json:
            click.echo(json.dumps(result))
        else:
            measured = (
                f"labels agree with this machine on {100 * result['label_agreement']:.1f}%"
                if "label_agreement" in result
                else f"embeddings' cosine to this machine's: mean {result['mean_cosine']:.5f}, min {result['min_cosine']:.5f}"
            )
            click.echo(
                f"{'PASSED' if result['passed'] else 'FAILED'}: {result['device']} ({result['cpu']}, emulated), "
                f"onnxruntime {result['onnxruntime']} aarch64 vs host {result['host_onnxruntime']}: {measured} of "
                f"{result['texts']} texts (needs {result['needs']}); {result['emulated_seconds']:.0f} s under emulation"
            )
        sys.exit(0 if result["passed"] else 1)
    if eval_tokens is None:
        eval_tokens = 0 if manifest.precision == "fp32" else 256
    result = verify(bundle, emulate, ort_version, tokens, progress=echo_err, eval_tokens=eval_tokens)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(
            f"{'PASSED' if result['passed'] else 'FAILED'}: {result['device']} ({result['cpu']}, emulated), "
            f"onnxruntime {result['onnxruntime']} aarch64 vs host {result['host_onnxruntime']}"
        )
        click.echo(
            f"  prompt ids identical: {result['same_prompt_ids']}; greedy tokens agreeing: "
            f"{result['tokens_agreeing']}/{result['tokens']}; max logit difference "
            f"{100 * result['max_relative_logit_diff']:.3f}% of the largest logit (tolerance {100 * result['tolerance']:.1f}%)"
        )
        click.echo(
            f"  emulated text: {result['text']!r}; first token {result['emulated_first_token_s']:.1f} s, "
            f"{result['emulated_seconds']:.0f} s in all under emulation; peak RSS {result['emulated_peak_rss_mb'] or 0:.0f} MB "
            f"emulated (qemu included) vs {result['host_peak_rss_mb'] or 0:.0f} MB on this machine"
        )
        if "statistics" in result:
            st, budget = result["statistics"], result["statistics"]["budget"]
            click.echo(
                f"  over {st['tokens']} tokens of eval.txt: next-token agreement {100 * st['top1_agreement']:.1f}%"
                + (f" (needs {100 * budget['min_top1']:.0f}%)" if budget else "")
                + f", perplexity {st['perplexity_emulated']:.3f} emulated vs {st['perplexity_host']:.3f} host "
                + f"({100 * st['ppl_difference']:+.2f}%"
                + (f", allowed ±{100 * budget['max_ppl_difference']:.1f}%)" if budget else "; fp32 has no budget)")
                + ("; greedy tokens part at a near-tie" if result.get("first_disagreement_near_tie") else "")
            )
    if not result["passed"]:
        sys.exit(1)
