"""The `edge-slm` command line: parse, call one library function, print.

    edge-slm targets [--json]
    edge-slm build --target NAME|FILE [--model REF] [--out DIR] [--precision P] [--allow-accuracy-loss]
                   [--calibration FILE]
    edge-slm prune --model M --out DIR [--ffn R] [--head-groups N] [--layers N] [--recover-steps N]
    edge-slm inspect BUNDLE [--json] [--no-checksums]
    edge-slm generate BUNDLE PROMPT [--chat] [--max-new-tokens N] [--temperature T] ... [--json]
    edge-slm chat BUNDLE
    edge-slm classify BUNDLE TEXT... | --file FILE [--json]
    edge-slm embed BUNDLE TEXT... | --file FILE [--out vectors.npy]
    edge-slm index DOCS --embedder BUNDLE --out INDEX
    edge-slm ask INDEX QUESTION [--decoder BUNDLE] [-k N] [--json]
    edge-slm translate BUNDLE TEXT... [--beams N] [--max-tokens N] [--target-lang L] [--json]
    edge-slm finetune --model M --data train.jsonl [--eval eval.jsonl] --out DIR [--epochs N] [--lr 1e-5]
    edge-slm eval BUNDLE --text FILE [--reference BUNDLE] [--json]   (decoders)
    edge-slm eval BUNDLE [--data test.jsonl|retrieval.json] [--json]  (encoders)
    edge-slm bench BUNDLE [--threads 1,2] [--prompt-tokens 128] [--gen-tokens 64] [--out FILE.jsonl]
    edge-slm report RESULTS.jsonl... --out DIR
    edge-slm verify BUNDLE --emulate cortex-a72|cortex-a76 [--onnxruntime VERSION]

Errors are one line on stderr and exit code 2; `edge-slm --debug ...` shows the traceback.
"""

from __future__ import annotations

import signal
import sys

import click

from edge_slm.commands import (
    ask,
    bench,
    build,
    deploy,
    encode,
    evaluate,
    finetune,
    generate,
    index,
    inspect,
    prune,
    report,
    serve,
    targets,
    translate,
    verify,
)
from edge_slm.commands.extras import extra_of
from edge_slm.commands.options import echo_err
from edge_slm.core.errors import EdgeSlmError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="edge-slm")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Build small language models into ONNX bundles for edge devices, and run them there."""
    ctx.obj = {"debug": debug}


for command in (
    targets.targets,
    build.build,
    prune.prune,
    inspect.inspect,
    generate.generate,
    generate.chat,
    encode.classify,
    encode.embed,
    index.index_command,
    ask.ask_command,
    translate.translate,
    finetune.finetune,
    evaluate.eval_command,
    bench.bench,
    report.report,
    verify.verify_command,
    serve.serve,
    deploy.deploy,
):
    cli.add_command(command)


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
        echo_err(f"error: {exc}")
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        echo_err(
            "interrupted: nothing was published (the previous bundle, if any, is intact)"
            if {"build", "prune"} & set(args)
            else "interrupted"
        )
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ModuleNotFoundError as exc:  # an optional dependency set missing, met deeper than the command's check
        missing = extra_of(exc, next((a for a in args if a in cli.commands), "this command"))
        if missing is None or debug:
            raise
        echo_err(f"error: {missing}")
        sys.exit(2)
    except OSError as exc:  # the disk, permissions: the user's to fix, so one line and exit 2
        if debug:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        echo_err(f"error: {exc.strerror or exc}{where}: free space or fix permissions, then run it again")
        sys.exit(2)
    except Exception as exc:  # an unexpected failure: still one line unless --debug
        if debug:
            raise
        echo_err(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()
