"""The host/device split, kept by a test: the device half (core, runtime, the commands' modules and
the benchmark worker in runtime/) never imports the build half or the host-side harness, at import time or
inside functions, and importing the runtime loads no torch, transformers, optimum or onnx."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "edge_slm"
HOST_ONLY = ("edge_slm.builder", "edge_slm.harness")
# What a device imports: the CLI, the runtime and the service, the benchmark worker (the wheel
# carries the build half too, and nothing there may import it).
DEVICE_PARTS = (
    "__init__.py",
    "cli.py",
    "commands",
    "core",
    "runtime",
    "serve",
    "data",
)
HEAVY = ("torch", "transformers", "optimum", "onnx", "gguf", "matplotlib")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("part", ["core", "runtime", "serve"])
def test_the_device_half_imports_nothing_from_the_host_half(part):
    offences = []
    for path in sorted((PACKAGE / part).rglob("*.py")):
        for name in imported_modules(path):
            if name.startswith(HOST_ONLY) or name.startswith("edge_slm.harness") or name.split(".")[0] in HEAVY:
                offences.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert offences == []


def test_core_imports_no_other_half():
    for path in sorted((PACKAGE / "core").rglob("*.py")):
        for name in imported_modules(path):
            if name.startswith("edge_slm."):
                assert name.startswith(("edge_slm.core", "edge_slm.__version__")), f"{path.name} imports {name}"


def test_the_device_parts_import_no_host_module_at_import_time():
    """Every module a device runs imports in a fresh interpreter in which torch, onnx and the
    build half are made unimportable."""
    modules = []
    for part in DEVICE_PARTS:
        paths = [PACKAGE / part] if part.endswith(".py") else sorted((PACKAGE / part).rglob("*.py"))
        for path in paths:
            rel = path.relative_to(PACKAGE.parent).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            modules.append(".".join(parts))
    code = (
        "import sys\n"
        f"for name in {HEAVY + HOST_ONLY!r}: sys.modules[name] = None\n"
        f"for m in {modules!r}: __import__(m)\n"
        "print(len(sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(modules) >= 20


def test_runtime_import_loads_no_heavy_module():
    code = (
        "import sys, edge_slm.runtime, edge_slm.cli\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m.startswith('edge_slm.builder')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


WORKER_TARGET = re.compile(r"edge_slm(\.\w+)+:")


def worker_targets(path: Path) -> list[str]:
    """The "package.module:function" strings (or their f-string beginnings) a file hands to the worker protocol."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            text = str(node.values[0].value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        else:
            continue
        if WORKER_TARGET.match(text):
            found.append(text)
    return found


def test_what_another_interpreter_runs_lives_in_the_device_half():
    """Every module run through the worker protocol (on a device over SSH, under qemu, in a fresh
    process) is in runtime/ or core/, and nothing under harness/ is run that way: the harness is
    host-only."""
    targets = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for target in worker_targets(path):
            targets[target] = path.relative_to(PACKAGE)
    assert {t.split(":")[0] for t in targets} >= {
        "edge_slm.runtime.bench",
        "edge_slm.runtime.bench_encoder",
        "edge_slm.runtime.probe",
    }
    for target, where in targets.items():
        module = target.split(":")[0]
        assert module.startswith(("edge_slm.runtime.", "edge_slm.core.")), f"{where} runs {target} in a worker"
        assert (PACKAGE.parent / (module.replace(".", "/") + ".py")).is_file(), f"{where}: no module {module}"
    # The fleet driver's two steps that Ansible runs on the control machine (`python -m
    # edge_slm.harness.fleet prepare | smoke-check`, from the playbooks) are host-side, not workers.
    control_machine = {"fleet.py"}
    for path in sorted((PACKAGE / "harness").rglob("*.py")):
        if path.name not in control_machine:
            assert "__main__" not in path.read_text(), f"{path.relative_to(PACKAGE)} runs as a script (a worker)"
    for playbook in sorted((PACKAGE / "harness" / "ansible").rglob("*.yml")):
        for line in playbook.read_text().splitlines():
            # On a device the role imports only the device half; the host half only on the control machine.
            if "edge_slm.harness" in line or "edge_slm.builder" in line:
                assert "ansible_playbook_python" in line, f"{playbook.relative_to(PACKAGE)}: {line.strip()}"
