"""The `edge-slm` command line: parse, call one library function, print.

    edge-slm targets [--json]
    edge-slm build --target NAME|FILE [--model REF] [--out DIR]
    edge-slm inspect BUNDLE [--json] [--no-checksums]

Errors are one line on stderr and exit code 2; `edge-slm --debug ...` shows the traceback.
"""

from __future__ import annotations

import json
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
def build(target: str, model: str | None, out: Path | None) -> None:
    """Build, validate and bundle a model for one target."""
    from .targets import load_profile

    profile = load_profile(target)  # fail fast, before the heavy imports
    from .pipeline import build as run_build

    out = out or Path("export") / profile.name
    manifest = run_build(model, profile, out, echo=_echo_err)
    size = sum(f["bytes"] for f in manifest["files"].values()) / 1e6
    click.echo(f"bundle ready: {out}  ({manifest['precision']}, {size:.0f} MB, validated against torch)")
    click.echo(f"inspect it:   edge-slm inspect {out}")
    click.echo(f"run it:       edge-slm generate {out} \"What is the capital of France?\" --chat")


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
        f"graph        {graph['kind']}, {graph['nodes']} nodes, opset {graph['opset']}, IR {graph['ir_version']}",
        f"ops          " + ", ".join(f"{k} {v}" for k, v in graph["op_counts"].items()),
        f"validation   {'passed' if val.get('passed') else 'NOT RUN'}: max |diff| vs torch logits "
        f"{val.get('max_abs_diff', {}).get('logits', float('nan')):.2e} (tol {val.get('tolerance', {}).get('logits')}), "
        f"present {val.get('max_abs_diff', {}).get('present', float('nan')):.2e}",
        f"versions     " + ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items()),
        "files",
    ]
    for name, info in manifest["files"].items():
        lines.append(f"  {name:<22} {info['bytes'] / 1e6:>9.2f} MB  sha256 {info['sha256'][:16]}…  "
                     f"{'size ok' if no_checksums else 'ok'}")
    click.echo("\n".join(lines))
    click.echo("sizes verified" if no_checksums else "all checksums verified")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="edge-slm", standalone_mode=False)
    except EdgeSlmError as exc:
        if debug:
            raise
        _echo_err(f"error: {exc}")
        sys.exit(2)
    except click.exceptions.Abort:
        _echo_err("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _echo_err("interrupted: nothing was published (the previous bundle, if any, is intact)")
        sys.exit(130)
    except Exception as exc:  # an unexpected failure: still one line unless --debug
        if debug:
            raise
        _echo_err(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()
