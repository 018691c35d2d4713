"""Target profiles: every shipped profile loads; bad profiles fail naming the file, key and fix."""

from pathlib import Path

import pytest

from edge_slm.core.errors import ProfileError
from edge_slm.core.targets import TARGETS_DIR, known_targets, load_profile

REQUIRED = {"rpi4", "rpi5", "x86-laptop", "jetson-orin"}


def test_shipped_profiles_load_and_are_frozen():
    assert REQUIRED <= set(known_targets())
    for name in known_targets():
        profile = load_profile(name)
        assert profile.name == name
        assert profile.runtime.threads >= 1 and profile.export.context_length >= 16
        with pytest.raises(AttributeError):
            profile.name = "other"  # frozen dataclass
    assert load_profile("rpi4").device.arch == "aarch64"
    assert "asimddp" in load_profile("rpi5").device.features
    assert "asimddp" not in load_profile("rpi4").device.features
    assert load_profile("jetson-orin").runtime.execution_providers[0] == "TensorrtExecutionProvider"


def test_every_hardware_choice_has_a_reason():
    """Each value line in the device, runtime and export sections carries a '#' comment, or is
    covered by the same key's comment in another profile (identical reasons are not repeated)."""
    reasons: dict[str, int] = {}
    for path in TARGETS_DIR.glob("*.toml"):
        section = ""
        for line in path.read_text().splitlines():
            if line.startswith("["):
                section = line.strip("[]")
            elif "=" in line and section in ("device", "runtime", "export") and "#" in line:
                reasons[f"{section}.{line.split('=')[0].strip()}"] = 1
    for key in (
        "device.features",
        "device.cores",
        "runtime.threads",
        "runtime.onnxruntime_versions",
        "export.graph",
        "export.opset",
        "export.ir_version",
        "export.context_length",
    ):
        assert key in reasons, f"no profile gives a reason for {key}"


def test_unknown_target_lists_known_ones():
    with pytest.raises(ProfileError, match=r"unknown target 'nosuch': known targets are .*rpi4.*x86-laptop"):
        load_profile("nosuch")


def _variant(tmp_path: Path, old: str, new: str) -> Path:
    text = (TARGETS_DIR / "rpi5.toml").read_text()
    assert old in text
    path = tmp_path / "board.toml"
    path.write_text(text.replace(old, new, 1))
    return path


def test_misspelt_key_is_named(tmp_path):
    path = _variant(tmp_path, "threads = 4", "thread = 4")
    with pytest.raises(ProfileError) as err:
        load_profile(str(path))
    assert str(path) in str(err.value)
    assert "unknown key 'runtime.thread'" in str(err.value)
    assert "threads" in str(err.value)  # the allowed keys are listed


def test_wrong_type_missing_field_and_bad_value(tmp_path):
    with pytest.raises(ProfileError, match=r"'runtime.threads' must be int, got str"):
        load_profile(str(_variant(tmp_path, "threads = 4", 'threads = "four"')))
    with pytest.raises(ProfileError, match=r"missing required key 'device.cores'"):
        load_profile(str(_variant(tmp_path, "cores = 4", "")))
    with pytest.raises(ProfileError, match=r"'export.graph' is 'traced'; allowed values: 'fused', 'generic'"):
        load_profile(str(_variant(tmp_path, 'graph = "fused"', 'graph = "traced"')))
    with pytest.raises(ProfileError, match=r"'runtime.threads' is 0; it must be at least 1"):
        load_profile(str(_variant(tmp_path, "threads = 4", "threads = 0")))
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(str(_variant(tmp_path, "threads = 4", "threads = = 4")))


def test_user_profile_by_path(tmp_path):
    path = _variant(tmp_path, 'name = "rpi5"', 'name = "my-board"')
    assert load_profile(str(path)).name == "my-board"
