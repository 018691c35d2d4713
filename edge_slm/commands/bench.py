"""`edge-slm bench BUNDLE [--host user@dev | --inventory FILE]`: benchmark records, here or on devices."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import click

from edge_slm.commands.options import echo_err, ssh_device, ssh_options, threads_option
from edge_slm.core.errors import EdgeSlmError


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path), required=False)
@click.option("--prompt-tokens", type=int, default=128, show_default=True)
@click.option("--gen-tokens", type=int, default=64, show_default=True)
@click.option("--repetitions", "-r", type=int, default=5, show_default=True)
@click.option("--warmup", type=int, default=1, show_default=True)
@threads_option(several=True)
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    default=None,
    help="fp32 bundle: top-1 agreement (decoder), or the translation gate's figures (seq2seq).",
)
@click.option("--no-accuracy", is_flag=True, help="Skip the perplexity run.")
@ssh_options()
@click.option(
    "--inventory",
    type=click.Path(path_type=Path),
    default=None,
    help="An Ansible inventory whose hosts name their edge_slm_bundle: each benchmarked there, its records "
    "appended to benchmarks/results/<target>/<host>.jsonl.",
)
@click.option(
    "--forks", type=click.IntRange(min=1), default=5, show_default=True, help="With --inventory: hosts at once."
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Append the records to this JSONL file: a new file, or one holding only bench records "
    "(anything else is refused before the benchmark runs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON lines.")
@click.option(
    "--against",
    type=click.Path(path_type=Path),
    multiple=True,
    help="Bench records (JSONL) of other bundles of the same base model, shown side by side with this run's: "
    "pruned against unpruned, int8 against fp32 (speed ratios; encoders' accuracy points, decoders' perplexity).",
)
@click.option(
    "--context",
    type=click.IntRange(min=2),
    default=None,
    help="KV cache capacity in tokens [the bundle's context length]; compare runtimes at equal capacity.",
)
def bench(
    bundle: Path | None,
    prompt_tokens: int,
    gen_tokens: int,
    repetitions: int,
    warmup: int,
    threads: list[int] | None,
    reference: Path | None,
    no_accuracy: bool,
    host: str | None,
    port: int,
    identity: str | None,
    strict_host_keys: bool,
    remote_python: str,
    inventory: Path | None,
    out: Path | None,
    as_json: bool,
    context: int | None,
    forks: int,
    against: tuple[Path, ...],
) -> None:
    """Measure load, first token, prefill and decode speed, latency, memory and accuracy (translation
    bundles: sentences per second and latency)."""
    from edge_slm.runtime.bench import bench_bundle, table

    if repetitions < 1 or warmup < 0 or prompt_tokens < 1 or gen_tokens < 2:
        raise click.UsageError("--repetitions must be at least 1, --gen-tokens at least 2, --warmup 0 or more")
    if bundle is None and inventory is None:
        raise click.UsageError("give a BUNDLE (or --inventory FILE)")
    if out is not None:
        check_records_file(out)
    earlier = read_against(against)
    failures = {}
    config = {
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "repetitions": repetitions,
        "warmup": warmup,
        "accuracy": not no_accuracy,
        "context": context,
    }
    if host or inventory:
        from edge_slm.harness.remote import bench_remote

        if reference:
            raise click.UsageError(
                "--reference works on this machine only; run `edge-slm eval` on the device for top-1"
            )
        if inventory:
            # `edge-slm bench` on every host through the role, with the same settings.
            args = (
                ["--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(gen_tokens)]
                + ["-r", str(repetitions), "--warmup", str(warmup)]
                + (["--threads", ",".join(map(str, threads))] if threads else [])
                + (["--no-accuracy"] if no_accuracy else [])
                + (["--context", str(context)] if context else [])
            )
            records, failures = bench_over_inventory(inventory, args, forks)
        else:
            device = ssh_device(host, port, identity, remote_python, strict_host_keys)
            records = bench_remote(device, bundle, config, progress=echo_err)
    else:
        records = bench_bundle(bundle, reference=reference, progress=echo_err, **config)
    if out and records:
        append_records(out, records)
        echo_err(f"appended {len(records)} records to {out}")
    if as_json:
        for record in records:
            click.echo(json.dumps(record))
    elif records:
        from edge_slm.runtime.bench_results import record_family

        families = {record_family(r) for r in records}
        if families == {"encoder"}:
            from edge_slm.runtime.bench_encoder import encoder_table as table
        elif families == {"seq2seq"}:
            from edge_slm.runtime.bench_seq2seq import seq2seq_table as table
        click.echo(table(records))
        if earlier:
            from edge_slm.runtime.bench_variants import variants_table

            side_by_side = variants_table(earlier + records)
            click.echo("\n" + side_by_side if side_by_side else "--against: no bundle of this run's base model there")
    for where, why in failures.items():
        echo_err(f"error: {why}")
    if failures:
        sys.exit(2)


def read_against(paths: tuple[Path, ...]) -> list[dict]:
    """The records of --against's files, read (and refused with the line at fault) before the benchmark runs."""
    if not paths:
        return []
    from edge_slm.harness.report import read_records

    return read_records(list(paths))


def check_records_file(out: Path) -> bool:
    """Refuse an --out that is not a new file or a file of bench records (every line one, as
    `record_problem` reads them): a directory, a link, a user's CSV. True if the file's last line
    lacks its newline (so an append starts a new line)."""
    from edge_slm.runtime.bench import record_problem

    if out.is_symlink():
        raise EdgeSlmError(f"--out {out} is a symbolic link: give the results file itself or a new file name")
    if out.is_dir():
        raise EdgeSlmError(f"--out {out} is a directory: give a .jsonl file name, e.g. {out / 'results.jsonl'}")
    if not out.exists():
        folder = next(p for p in out.absolute().parents if p.exists())
        if not os.access(folder, os.W_OK | os.X_OK):
            raise EdgeSlmError(f"--out {out}: {folder} is not writable by this user: choose another --out")
        return False
    if not out.is_file() or not os.access(out, os.R_OK | os.W_OK) or not out.stat().st_mode & stat.S_IWUSR:
        raise EdgeSlmError(f"--out {out} is not a file this user can read and write: choose another --out")
    fix = "bench appends only to its own results files: choose another --out"
    try:
        text = out.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise EdgeSlmError(f"--out {out} is not a UTF-8 file of bench records; {fix}") from None
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            problem = record_problem(json.loads(line))
        except (ValueError, RecursionError):
            problem = "not a JSON record"
        if problem:
            raise EdgeSlmError(f"--out {out}:{number}: {problem}; {fix}")
    return bool(text) and not text.endswith("\n")


def append_records(out: Path, records: list[dict]) -> None:
    """Append `records` as JSON lines after checking the file again (it may have changed while the
    benchmark ran), in one write so that a concurrent bench's lines do not interleave with ours."""
    newline = check_records_file(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as handle:
        handle.write(("\n" if newline else "") + "".join(json.dumps(record) + "\n" for record in records))


def bench_over_inventory(inventory: Path, args: list[str], forks: int) -> tuple[list[dict], dict[str, str]]:
    """Every host of an Ansible inventory through the edge_slm role (harness/fleet.py); each host's
    records appended to benchmarks/results/<target>/<host>.jsonl. The TOML inventory of earlier
    versions is converted to an Ansible one beside it, and the run stops to say so."""
    from edge_slm.harness import fleet

    if inventory.suffix == ".toml":
        converted = convert_toml_inventory(inventory)
        raise EdgeSlmError(
            f"--inventory {inventory}: bench takes an Ansible inventory now; {converted} holds the same devices: "
            f"check it, then run again with --inventory {converted}"
        )
    if not inventory.is_file():
        raise click.UsageError(f"--inventory {inventory}: no such file")
    run, found = fleet.bench_fleet(inventory, args, forks=forks, progress=echo_err)
    records = []
    for (target, host), got in sorted(found.items()):
        out = Path("benchmarks/results") / target / f"{host}.jsonl"
        append_records(out, got)
        echo_err(f"{host}: {len(got)} records appended to {out}")
        records += got
    for line in run.recap_lines():
        echo_err(line)
    return records, {host: f"{host}: {why}" for host, why in run.failures.items()}


def convert_toml_inventory(inventory: Path) -> Path:
    """An Ansible YAML inventory (JSON is YAML) with the TOML inventory's devices, written beside it
    (never over an existing file)."""
    from edge_slm.core.atomic import write_text
    from edge_slm.harness.remote import read_inventory

    hosts = {}
    for n, device in enumerate(read_inventory(inventory), 1):
        user, _, address = device.destination.rpartition("@")
        entry = {"ansible_host": address, "ansible_port": device.port, "edge_slm_bundle": device.bundle}
        entry |= {"ansible_user": user} if user else {}
        entry |= {"ansible_ssh_private_key_file": device.identity} if device.identity else {}
        entry |= {"ansible_python_interpreter": device.python} if device.python != "python3" else {}
        entry |= {"edge_slm_target": device.target} if device.target else {}
        hosts[f"{address}-{n}" if address in {h.split("-")[0] for h in hosts} else address] = entry
    out = inventory.with_suffix(".yml")
    if out.exists():
        raise EdgeSlmError(
            f"--inventory {inventory}: bench takes an Ansible inventory now, and {out} exists already: "
            "write the devices into an Ansible inventory and pass it"
        )
    write_text(out, json.dumps({"all": {"hosts": hosts}}, indent=2) + "\n")
    return out
