"""The docs state what the code does: the command reference is rendered from the commands, and the
bundle's files and graph signature in docs/bundle-format.md are those of a built bundle."""

import re
from pathlib import Path

import onnx

from edge_slm.commands.doc import CLI_DOC, REGENERATE, render

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_the_cli_reference_is_the_commands():
    current = CLI_DOC.read_text(encoding="utf-8")
    assert current == render(current), f"docs/cli.md differs from the commands: run `{REGENERATE}` and commit it"


def test_the_cli_reference_names_every_option_of_every_command():
    """The renderer itself leaves nothing out: every option string of every command is in the doc."""
    from edge_slm.cli import cli

    text = CLI_DOC.read_text(encoding="utf-8")
    for name, command in cli.commands.items():
        assert f"### edge-slm {name}\n" in text
        section = text.split(f"### edge-slm {name}\n", 1)[1].split("\n### ", 1)[0]
        for param in command.params:
            for opt in param.opts if param.param_type_name == "option" else []:
                assert f"{opt}" in section, (name, opt)


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _signature_lines(section: str, heading: str) -> list[tuple[str, list[str]]]:
    """`- \\`name [dim, dim]\\`` items under `heading`, as (name, dims), with {i} and key|value expanded
    for the tiny model's 2 layers."""
    block = section.split(heading, 1)[1].split("\n\n", 2)[1]
    items = []
    for name, dims in re.findall(r"^- `(\S+) \[([^\]]*)\]`", block, re.M):
        for layer in range(2) if "{i}" in name else [None]:
            for kind in ("key", "value") if "key|value" in name else [None]:
                expanded = name.replace("{i}", str(layer)).replace("key|value", kind or "key|value")
                items.append((expanded, [d.strip() for d in dims.split(",")]))
    return items


def _same_dims(documented: list[str], actual: list) -> bool:
    named_sizes = {"kv_heads", "head_dim", "vocab"}  # numbers in a built graph, names in the doc
    return len(documented) == len(actual) and all(
        d == a if isinstance(a, str) else (d == str(a) or d in named_sizes) for d, a in zip(documented, actual)
    )


def test_bundle_format_lists_the_files_and_graph_signature_of_a_built_bundle(tiny_bundle):
    text = (DOCS / "bundle-format.md").read_text()
    paragraph = text.split("A bundle is a directory", 1)[1].split("\n\n", 1)[0]
    documented_files = sorted(set(re.findall(r"`([\w.]+\.(?:onnx|data|json))`", paragraph)))
    assert documented_files == sorted(p.name for p in tiny_bundle.iterdir())
    assert f"of {['', '', '', 'three', 'four', 'five', 'six', 'seven'][len(documented_files)]} files" in paragraph

    # The graph's own inputs: onnxruntime's list leaves out one with a default (logits_to_keep).
    graph = onnx.load(str(tiny_bundle / "model.onnx"), load_external_data=False).graph
    signature = _section(text, "Graph signature")
    for heading, actual in (("Inputs", graph.input), ("Outputs", graph.output)):
        documented = _signature_lines(signature, heading)
        assert [name for name, _ in documented] == [a.name for a in actual], heading
        for (name, dims), a in zip(documented, actual):
            shape = [d.dim_param or d.dim_value for d in a.type.tensor_type.shape.dim]
            assert _same_dims(dims, shape), (name, dims, shape)


def test_bundle_format_lists_the_files_of_an_encoder_bundle(classifier_bundle):
    section = _section((DOCS / "bundle-format.md").read_text(), "Encoder bundles")
    holds = section.split("The bundle\nholds", 1)[1].split(";", 1)[0]
    documented = set(re.findall(r"`([\w.]+\.(?:onnx|data|json))`", holds)) | {"manifest.json"}  # "and the manifest"
    assert "and the manifest" in holds and sorted(documented) == sorted(p.name for p in classifier_bundle.iterdir())


def test_every_path_the_docs_name_exists():
    """A file or folder of the repository named in the README or docs/ (edge_slm/..., tests/...,
    benchmarks/..., targets/...) is there: a move or rename updates the docs too."""
    repo = DOCS.parent
    missing = []
    for doc in sorted([*DOCS.glob("*.md"), repo / "README.md"]):
        for path in re.findall(r"(?<![\w/.])((?:edge_slm|tests|benchmarks|targets)/[\w./-]*[\w/])", doc.read_text()):
            if not (repo / path).exists() and path != "edge_slm/profiles/":  # targets/ as the wheel names it
                missing.append(f"{doc.name}: {path}")
    assert missing == []
