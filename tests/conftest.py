"""Tiny in-test models: Llama and Qwen2 layouts with 2 layers, a 300-token BPE tokenizer and a chat
template, built with a fixed seed in seconds. No test touches the network."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
# Where edge-slm keeps things for the user running the tests; the suite must leave them as they were.
REAL_HOME = Path.home()
REAL_STATE = [REAL_HOME / ".cache/edge-slm", REAL_HOME / ".local/share/edge-slm"]


def snapshot(folders: list[Path]) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folders`, with its size and modification time."""
    seen = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = os.path.join(root, name)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                seen[path] = (st.st_size, st.st_mtime_ns)
    return seen


@pytest.fixture(scope="session", autouse=True)
def hermetic_home(tmp_path_factory):
    """Every test runs with HOME, the XDG folders and EDGE_SLM_CACHE in temporary folders, so that
    nothing installs into or caches under the real home (checked at the end). EDGE_SLM_TEST_CACHE
    names a cache folder to share between runs instead (the default model's dequantized weights,
    the emulated Pi's Python, pip's downloads): a developer's or CI's opt-in."""
    before = snapshot(REAL_STATE)
    root = tmp_path_factory.mktemp("home")
    shared = os.environ.get("EDGE_SLM_TEST_CACHE")
    cache = Path(shared).resolve() if shared else root / ".cache"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HOME", str(root))
        env.setenv("XDG_CACHE_HOME", str(cache))
        env.setenv("XDG_DATA_HOME", str(root / ".local/share"))
        env.setenv("XDG_CONFIG_HOME", str(root / ".config"))
        env.setenv("EDGE_SLM_CACHE", str(cache / "edge-slm"))
        yield root
    after = snapshot(REAL_STATE)
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert not changed, (
        f"the real home's edge-slm folders changed during the tests: {changed[:5]} ({len(changed)} paths); "
        "a test wrote there, or another edge-slm ran as this user meanwhile"
    )


CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Small language models run on edge devices such as the Raspberry Pi.",
    "Quantization stores weights in eight bits; pruning removes channels.",
    "What is the capital of France? Paris is the answer, and Lyon is not.",
    "Numbers like 1234 and symbols like % & * appear in text too. Ünïcödé 東京.",
] * 20


def make_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def make_model(directory: Path, architecture: str = "llama", seed: int = 0, **overrides) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(directory)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    common.update(overrides)
    torch.manual_seed(seed)
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    with torch.no_grad():  # larger-than-init weights so that logits are not all near zero
        for param in model.parameters():
            param.mul_(4.0) if param.dim() > 1 else None
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    # Qwen2 layout: biases on q/k/v and an untied LM head.
    return make_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", tie_word_embeddings=False)


def make_encoder(directory: Path, task: str = "embedding", labels=("lights", "music"), seed: int = 0) -> Path:
    """A random 2-layer BERT (hidden 32) with a WordPiece tokenizer learned from the shipped intents:
    a plain encoder with sentence-transformers' mean pooling + normalize files, a classifier, or
    (task "question-answering") a BertForQuestionAnswering."""
    import json

    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import (
        BertConfig,
        BertForQuestionAnswering,
        BertForSequenceClassification,
        BertModel,
        BertTokenizerFast,
    )

    from edge_slm.core.labelled import INTENTS_TRAIN, read_examples

    # The vocabulary is built here rather than trained: tokenizers' trainer breaks frequency ties
    # in hash order, so each run would give the words other ids (and the random model other outputs).
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts: dict[str, int] = {}
    for example in read_examples(INTENTS_TRAIN):
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(example.text)):
            counts[word] = counts.get(word, 0) + 1
    letters = sorted({c for word in counts for c in word})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters)]
    vocab += [w for w in sorted(counts, key=lambda w: (-counts[w], w)) if w not in vocab][: 400 - len(vocab)]
    tok = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = BertTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(directory)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        # Wide weights: with BERT's 0.02 a random classifier gives every text the same label.
        # The same for a reader: its best span would be a near-tie, decided by rounding.
        initializer_range=0.02 if task == "embedding" else 0.5,
    )
    torch.manual_seed(seed)
    heads = {"classification": BertForSequenceClassification, "question-answering": BertForQuestionAnswering}
    model = heads.get(task, BertModel)(config)
    model.save_pretrained(directory)
    if task == "embedding":
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
        (directory / "modules.json").write_text(json.dumps(modules))
        (directory / "1_Pooling").mkdir()
        (directory / "1_Pooling" / "config.json").write_text(
            json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
        )
    return directory


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory) -> Path:
    return make_encoder(tmp_path_factory.mktemp("tiny-embedder"), seed=2)  # a seed whose all-int8 graph meets the gate


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    return make_encoder(tmp_path_factory.mktemp("tiny-classifier"), "classification", seed=1)


@pytest.fixture(scope="session")
def encoder_profile(tmp_path_factory) -> Path:
    """The x86-laptop profile with a short encoder input limit (the tiny BERT has 64 positions)."""
    path = tmp_path_factory.mktemp("profiles") / "tiny-encoder-laptop.toml"
    return write_profile(path, "x86-laptop", "tiny-encoder-laptop", encoder={"max_sequence_length": 32})


@pytest.fixture(scope="session")
def embedder_bundles(tmp_path_factory, tiny_embedder, encoder_profile):
    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    root = tmp_path_factory.mktemp("encoder-bundles")
    profile = load_profile(str(encoder_profile))
    fp32 = root / "fp32"
    build(str(tiny_embedder), profile, fp32, echo=lambda m: None, precision="fp32")
    int8 = root / "int8"
    build(str(tiny_embedder), profile, int8, echo=lambda m: None, allow_accuracy_loss=True)
    return fp32, int8


@pytest.fixture(scope="session")
def classifier_bundle(tmp_path_factory, tiny_classifier, encoder_profile):
    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    out = tmp_path_factory.mktemp("classifier-bundle") / "fp32"
    build(str(tiny_classifier), load_profile(str(encoder_profile)), out, echo=lambda m: None, precision="fp32")
    return out


def write_profile(path: Path, base: str, name: str, **sections) -> Path:
    """A shipped profile changed with `dataclasses.replace` (section -> {field: value}), written as
    a user's own TOML file: a changed or renamed field fails here instead of doing nothing."""
    import dataclasses

    import tomli_w

    from edge_slm.core.targets import load_profile

    profile = dataclasses.replace(load_profile(base), name=name)
    for section, fields in sections.items():
        profile = dataclasses.replace(profile, **{section: dataclasses.replace(getattr(profile, section), **fields)})

    def without_none(value):
        if isinstance(value, dict):
            return {k: without_none(v) for k, v in value.items() if v is not None}
        return value

    path.write_bytes(tomli_w.dumps(without_none(profile.to_dict())).encode())
    return path


@pytest.fixture(scope="session")
def tiny_profile(tmp_path_factory) -> Path:
    """The x86-laptop profile with a short context, as a user's own profile file; its precision is
    fp32 (the reference): tests ask for int8 with --precision."""
    path = tmp_path_factory.mktemp("profiles") / "tiny-laptop.toml"
    return write_profile(
        path, "x86-laptop", "tiny-laptop", export={"context_length": 128}, quantize={"precision": "fp32"}
    )


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_llama, tiny_profile) -> Path:
    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    build(str(tiny_llama), load_profile(str(tiny_profile)), out, echo=lambda m: None)
    return out


@pytest.fixture(scope="session")
def perturbed_llama(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama with noise added to its weights: the same tokenizer, other logits (a reference
    that agrees with the tiny model on most tokens, not all)."""
    import torch
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("perturbed") / "model"
    shutil.copytree(tiny_llama, out)
    model = LlamaForCausalLM.from_pretrained(out)
    torch.manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * param.std() * torch.randn_like(param)) if param.dim() > 1 else None
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def perturbed_bundle(perturbed_llama, tiny_profile, tmp_path_factory) -> Path:
    from edge_slm.builder.pipeline import build
    from edge_slm.core.targets import load_profile

    out = tmp_path_factory.mktemp("bundles") / "perturbed"
    build(str(perturbed_llama), load_profile(str(tiny_profile)), out, echo=lambda m: None)
    return out


@pytest.fixture(scope="session")
def jetson_profile(tmp_path_factory):
    """The jetson-orin profile with a short context."""
    path = tmp_path_factory.mktemp("profiles") / "tiny-jetson.toml"
    return write_profile(path, "jetson-orin", "tiny-jetson", export={"context_length": 128})


@pytest.fixture(scope="session")
def tiny_llama_shape(tiny_llama):
    """The tiny Llama's shape as the build records it (what the quantizers read)."""
    from edge_slm.builder.decoder.export import ModelShape, load_torch_model

    return ModelShape.of(load_torch_model(tiny_llama), context_length=64)


@pytest.fixture(scope="session")
def jetson_fp32_graph(tiny_llama, jetson_profile, tmp_path_factory):
    """The tiny model's fp32 graph, exported for the Jetson profile (separate RotaryEmbedding)."""
    from edge_slm.builder.decoder.export import export, load_torch_model
    from edge_slm.core.targets import load_profile

    return export(
        load_torch_model(tiny_llama), load_profile(str(jetson_profile)), tmp_path_factory.mktemp("fp32")
    ).onnx_path


# -- a real OpenSSH server on a loopback port, with throwaway keys (the "device" of the SSH tests) --
SSHD = "/usr/sbin/sshd"


@dataclasses.dataclass(frozen=True)
class SshServer:
    device: object  # edge_slm.harness.ssh.Device, logging in as the throwaway device user
    keys: Path  # client_key, other_key, known_hosts, sshd.log
    home: Path  # the device user's home: a fresh folder, never anyone's real one

    def __iter__(self):  # `device, keys = sshd`
        return iter((self.device, self.keys))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle, *flags, expect_healthy: bool = True) -> tuple[subprocess.Popen, str]:
    """`edge-slm serve BUNDLE` on a free loopback port with one thread (and `flags`), in its own
    process; returns it and its base address once /health answers 200 (or at once when
    `expect_healthy` is False, for a server expected to refuse or fail)."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "edge_slm.cli", "serve", str(bundle), "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen([*command, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while expect_healthy and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    if expect_healthy:
        proc.kill()
        raise AssertionError("the server did not become healthy")
    return proc, base


def wait_for_port(port: int, server: subprocess.Popen, log: Path, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(0.1)
    raise RuntimeError(f"sshd did not answer on 127.0.0.1:{port} within {seconds:.0f} s; its log:\n{log.read_text()}")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """sshd on loopback; the device is a throwaway user made for this session whose home is a fresh
    temporary folder, so that deploy and bench install into it and never into a real
    ~/.local/share/edge-slm. sshd, not the client, picks the login's home (from the user database,
    whatever HOME says), so a separate user is the way to give the device its own."""
    assert Path(SSHD).exists(), "openssh-server is not installed: run `make test`, which installs it"
    if os.geteuid() != 0:
        pytest.skip("the SSH tests make a throwaway device user with useradd: run them as root (as CI does)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key", "other_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    user = f"edge-slm-test-{os.getpid()}"
    # Outside pytest's temporary root, which only its owner may enter.
    home = Path(tempfile.mkdtemp(prefix="edge-slm-device-home-"))
    subprocess.run(
        # A password field of "*": no password, yet not a locked account (which sshd refuses).
        [
            "useradd",
            "--home-dir",
            str(home),
            "--no-create-home",
            "--shell",
            "/bin/sh",
            "--user-group",
            "--password",
            "*",
            user,
        ],
        check=True,
    )
    try:
        (home / "authorized_keys").write_text((d / "client_key.pub").read_text())
        subprocess.run(["chown", "-R", f"{user}:{user}", str(home)], check=True)
        os.chmod(home / "authorized_keys", 0o600)
        port = free_port()
        (d / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d / "host_key"}
AuthorizedKeysFile {home / "authorized_keys"}
PidFile {d / "sshd.pid"}
AllowUsers {user}
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
""")
        Path("/run/sshd").mkdir(exist_ok=True)
        log = d / "sshd.log"
        server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=log.open("wb"))
        try:
            wait_for_port(port, server, log)
            from edge_slm.harness.ssh import Device

            device = Device(
                f"{user}@127.0.0.1",
                port=port,
                identity=str(d / "client_key"),
                # The machine's own Debian Python (externally managed, as on a Pi) when it has one.
                python="/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable,
                known_hosts=str(d / "known_hosts"),
            )
            yield SshServer(device, d, home)
        finally:
            server.terminate()
            server.wait(timeout=10)
    finally:
        gone = subprocess.run(["userdel", user], capture_output=True, text=True)
        shutil.rmtree(home, ignore_errors=True)
        assert gone.returncode == 0, f"userdel {user}: {gone.stderr.strip()} (a process of the device was left running)"


def prompt_logits(path, ids, dtype=None):
    """Logits of one prompt through an ONNX decoder graph of the tiny models (2 KV heads of 16),
    from an empty cache, on the CPU provider."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: logits_to_keep is an input with a default, on purpose
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {
        "input_ids": np.array([ids]),
        "attention_mask": np.ones((1, len(ids)), np.int64),
        "position_ids": np.arange(len(ids))[None],
    }
    for inp in session.get_inputs()[3:]:
        feed[inp.name] = np.zeros((1, 2, 0, 16), dtype or np.float32)
    return session.run(["logits"], feed)[0][0]


def greedy_without_cache(path, ids, max_new_tokens, eos_ids, dtype=None) -> tuple[list[int], str]:
    """Greedy generation by running the whole sequence again for every token (no KV cache, plain
    onnxruntime): what the runtime's cached loop must reproduce. Returns (new ids, stop reason)."""
    out = []
    for _ in range(max_new_tokens):
        token = int(prompt_logits(path, list(ids) + out, dtype)[-1].argmax())
        if token in eos_ids:  # the runtime does not return the EOS token itself
            return out, "eos"
        out.append(token)
    return out, "max_new_tokens"
