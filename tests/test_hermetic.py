"""The suite's own guards: it runs under a temporary home and cache, the SSH device's home is a
fresh folder, and a server that never answers is an error with its log."""

import os
import subprocess
from pathlib import Path

import pytest
from conftest import REAL_HOME, free_port, wait_for_port

from edge_slm.core.cache import cache_root


def test_home_and_cache_are_temporary(hermetic_home):
    assert Path.home() == hermetic_home != REAL_HOME
    shared = os.environ.get("EDGE_SLM_TEST_CACHE")
    want = Path(shared).resolve() / "edge-slm" if shared else hermetic_home / ".cache" / "edge-slm"
    assert cache_root() == want
    assert not cache_root().is_relative_to(REAL_HOME / ".cache" / "edge-slm")


def test_the_ssh_device_logs_in_to_a_fresh_home(sshd):
    from edge_slm.harness.ssh import ssh

    home = ssh(sshd.device, 'echo "$HOME"; pwd; id -un').split()
    assert home == [str(sshd.home), str(sshd.home), sshd.device.host.split("@")[0]]
    assert not sshd.home.is_relative_to(REAL_HOME)


def test_a_server_that_never_answers_is_an_error_with_its_log(tmp_path):
    log = tmp_path / "server.log"
    with log.open("wb") as err:
        server = subprocess.Popen(["sh", "-c", "echo 'no host keys available' >&2; exit 1"], stderr=err)
    port = free_port()
    with pytest.raises(RuntimeError, match=rf"(?s)127.0.0.1:{port} within 2 s; its log:\nno host keys available"):
        wait_for_port(port, server, log, seconds=2)
