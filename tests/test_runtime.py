"""The torch-free runtime on a tiny bundle: greedy equality with transformers, cached vs
uncached decode, sampling, streaming, stop strings, chat with a kept cache, eval numbers."""

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from edge_slm import runtime
from edge_slm.core.errors import BundleError, EdgeSlmError
from edge_slm.runtime.evaluate import evaluate
from edge_slm.runtime.textstream import TextStream

PROMPTS = ["The capital of France is", "Small language models run on", "Numbers like 1234"]


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return runtime.load(tiny_bundle, threads=1)


@pytest.fixture(scope="module")
def hf(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype="float32").eval(), AutoTokenizer.from_pretrained(
        tiny_llama
    )


def test_runtime_imports_no_torch(tiny_bundle):
    code = (
        "import sys; from edge_slm import runtime; m = runtime.load(sys.argv[1]); m.generate('The capital', max_new_tokens=4); "
        "print(','.join(x for x in ('torch', 'transformers', 'optimum', 'onnx') if x in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tiny_bundle)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_transformers(model, hf, prompt):
    hf_model, hf_tok = hf
    ids = hf_tok(prompt).input_ids
    assert model.encode(prompt) == ids
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]),
            max_new_tokens=40,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )
    expected = out[0, len(ids) :].tolist()
    model.eos_ids = set()  # compare all 40 tokens, whatever the random model emits
    try:
        got = model.generate(prompt, max_new_tokens=40)
    finally:
        model.eos_ids = set(model.generation["eos_token_ids"])
    assert got.token_ids == expected
    assert got.prompt_token_ids == ids and got.stop_reason == "max_new_tokens"


def test_cached_decode_equals_recomputation(model):
    ids = model.encode("The capital of France is")
    model.session.reset()
    cached = [model.session.forward(ids)]
    seq = list(ids)
    for _ in range(32):
        seq.append(int(np.argmax(cached[-1])))
        cached.append(model.session.forward([seq[-1]]))
    model.session.reset()
    full = model.session.forward(seq, all_logits=True)
    model.session.reset()
    recomputed = full[len(ids) - 1 :]
    assert recomputed.shape == (33, model.session.vocab_size)
    assert np.abs(np.stack(cached) - recomputed).max() < 1e-4


def test_sampling_is_reproducible(model):
    a = model.generate("The capital", max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    b = model.generate("The capital", max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    c = model.generate("The capital", max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.95, seed=8)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    greedy = model.generate("The capital", max_new_tokens=24)
    assert (
        model.generate("The capital", max_new_tokens=24, temperature=0.7, top_k=1, seed=3).token_ids == greedy.token_ids
    )
    penalised = model.generate("The capital", max_new_tokens=24, repetition_penalty=10.0)
    assert len(set(penalised.token_ids)) >= len(set(greedy.token_ids))


def test_stream_never_splits_characters(model):
    text = "Ünïcödé 東京 ok 東京"
    ids = model.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    stream = TextStream(model.tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == model.decode(ids) == text


def test_stop_strings_are_cut_and_held_back(model):
    ids = model.encode("one two 東京 three")
    stream = TextStream(model.tokenizer, stop=("京 th",))
    pieces = []
    for token in ids:
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    assert stream.stopped and "".join(pieces) + stream.flush() == "one two 東"


def test_streamed_responses_add_up_to_generate(model):
    """One response per token: texts concatenate to generate()'s text, tokens to its ids, and the
    counters run; the last (only the last) has a finish reason."""
    result = model.generate("Small language", max_new_tokens=30)
    responses = list(model.stream("Small language", max_new_tokens=30))
    kept = [r for r in responses if r.stop_reason != "eos"]
    assert "".join(r.text for r in responses) == result.text == model.decode(result.token_ids)
    assert [r.token for r in kept] == result.token_ids and len(result.token_ids) > 0
    assert [r.generation_tokens for r in kept] == list(range(1, len(kept) + 1))
    assert [r.finish_reason for r in responses[:-1]] == [None] * (len(responses) - 1)
    assert responses[-1].stop_reason == result.stop_reason and responses[-1].finish_reason == result.finish_reason
    assert {r.prompt_tokens for r in responses} == {len(result.prompt_token_ids)}
    assert responses[0].ttft_ms > 0 and responses[0].prompt_tps > 0 and responses[0].generation_tps == 0
    assert all(r.ttft_ms == responses[0].ttft_ms for r in responses)
    if len(kept) > 2:
        assert responses[-1].generation_tps > 0


def test_stream_logprobs_are_the_raw_logits_log_softmax(model):
    """Each response's logprob is log softmax of the model's logits at that token: checked against
    an independent uncached scoring pass over prompt + generated ids, also while sampling (the
    logprob is of the raw logits, not of the tempered distribution)."""
    prompt = model.encode("The capital of France is")
    for sampling in ({}, {"temperature": 1.5, "top_k": 5, "seed": 3, "repetition_penalty": 1.3}):
        responses = list(model.stream(prompt, max_new_tokens=12, **sampling))
        tokens = [r.token for r in responses]
        scored = model.logprobs(prompt + tokens)  # row t: log p(token t+1 | tokens ..t)
        want = [scored[len(prompt) - 1 + i, token] for i, token in enumerate(tokens)]
        assert [r.logprob for r in responses] == pytest.approx(want, abs=1e-4)
        assert all(r.logprob <= 0 for r in responses)


def test_finish_reasons(model):
    """ "length" at max_new_tokens, "stop" at a stop string and at the end-of-sequence token."""
    *_, last = model.stream("The capital", max_new_tokens=5)
    assert (last.finish_reason, last.stop_reason, last.generation_tokens) == ("length", "max_new_tokens", 5)
    sampled = {"temperature": 1.0, "seed": 1}  # the tiny random model's greedy text is one repeated byte
    full = model.generate("The capital", max_new_tokens=20, **sampled)
    assert " capital" in full.text
    responses = list(model.stream("The capital", max_new_tokens=20, stop=(" capital",), **sampled))
    assert (responses[-1].finish_reason, responses[-1].stop_reason) == ("stop", "stop_string")
    assert "".join(r.text for r in responses) == full.text[: full.text.index(" capital")]
    # The end-of-sequence token: make a token that greedy decoding reaches the model's EOS.
    greedy = model.generate("The capital", max_new_tokens=20)
    eos = greedy.token_ids[-1]
    at = greedy.token_ids.index(eos)
    model.eos_ids = {eos}
    try:
        responses = list(model.stream("The capital", max_new_tokens=20))
        result = model.generate("The capital", max_new_tokens=20)
    finally:
        model.eos_ids = set(model.generation["eos_token_ids"])
    assert [r.token for r in responses] == greedy.token_ids[: at + 1]
    last = responses[-1]
    assert (last.finish_reason, last.stop_reason, last.generation_tokens) == ("stop", "eos", at)
    assert result.token_ids == greedy.token_ids[:at] and result.stop_reason == "eos"
    assert "".join(r.text for r in responses) == result.text == model.decode(greedy.token_ids[:at])
    with pytest.raises(EdgeSlmError, match="max_new_tokens is 0; generate 1 token or more"):
        next(model.stream("The capital", max_new_tokens=0))


def test_context_limits(model):
    long_prompt = " ".join(["capital"] * 200)
    with pytest.raises(EdgeSlmError, match=r"the prompt has \d+ tokens; the bundle's context is 128"):
        model.generate(long_prompt)
    near = model.encode(" ".join(["capital"] * 120))[:120]
    model.eos_ids = set()
    try:
        result = model.generate(near, max_new_tokens=64)
        truncated = model.generate(long_prompt, max_new_tokens=4, truncate=True)
    finally:
        model.eos_ids = set(model.generation["eos_token_ids"])
    assert result.stop_reason == "context_full" and len(result.token_ids) == 128 - 120 + 1
    assert len(truncated.prompt_token_ids) == 64 and len(truncated.token_ids) == 4


def test_chat_reuses_cache_and_matches_fresh_run(model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    first = model.chat(messages, max_new_tokens=12)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And of Italy?"}]
    second = model.chat(messages, max_new_tokens=12)
    assert second.reused_tokens >= len(first.prompt_token_ids)
    fresh = model.chat(messages, max_new_tokens=12, keep_cache=False)
    assert fresh.reused_tokens == 0 and fresh.token_ids == second.token_ids
    with pytest.raises(EdgeSlmError, match="unknown chat role 'robot'"):
        model.chat([{"role": "robot", "content": "hi"}])


def test_eval_matches_torch_perplexity(model, hf, perturbed_llama, perturbed_bundle):
    """Perplexity, and against a reference (the tiny model with perturbed weights) top-1 agreement,
    mean KL and the reference's perplexity, all computed again with torch."""
    from transformers import LlamaForCausalLM

    hf_model, _ = hf
    reference_model = LlamaForCausalLM.from_pretrained(perturbed_llama).eval()
    text = "The capital of France is Paris. Small language models run on edge devices. " * 6
    result = evaluate(model, text, reference=runtime.load(perturbed_bundle, threads=1), window=64)
    ids = model.encode(text)
    nll = ref_nll = kl = 0.0
    count = agree = 0
    for start in range(0, len(ids), 64):
        chunk = ids[start : start + 64]
        if len(chunk) < 2:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(torch.tensor([chunk])).logits[0, :-1].double(), -1)
            ref = torch.log_softmax(reference_model(torch.tensor([chunk])).logits[0, :-1].double(), -1)
        rows, targets = torch.arange(len(chunk) - 1), torch.tensor(chunk[1:])
        nll -= logp[rows, targets].sum().item()
        ref_nll -= ref[rows, targets].sum().item()
        agree += int((logp.argmax(-1) == ref.argmax(-1)).sum())
        kl += (ref.exp() * (ref - logp)).sum().item()
        count += len(chunk) - 1
    assert result["scored_tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert result["reference_perplexity"] == pytest.approx(math.exp(ref_nll / count), rel=1e-4)
    assert 0.2 < agree / count < 0.98, agree / count  # the perturbation changes some top-1 tokens
    assert abs(result["top1_agreement"] - agree / count) <= 1 / count  # one near-tie may go either way
    assert result["mean_kl"] == pytest.approx(kl / count, rel=1e-3) and kl > 0


def cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "edge_slm.cli", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def test_cli_generate_json(tiny_bundle):
    proc = cli("generate", str(tiny_bundle), "The capital of France is", "-n", "8", "--json", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("prompt_token_ids", "token_ids", "text", "ttft_ms", "decode_tokens_per_s", "peak_rss_mb"):
        assert key in out
    assert out["ttft_ms"] > 0 and out["peak_rss_mb"] > 10


def test_cli_chat_two_turns(tiny_bundle):
    proc = cli(
        "chat", str(tiny_bundle), "-n", "6", stdin="What is the capital of France?\nAnd of Italy?\n/reset\nHi\n/exit\n"
    )
    assert proc.returncode == 0, proc.stderr
    stats = [line for line in proc.stderr.splitlines() if "prompt tokens" in line]
    assert len(stats) == 3
    assert "0 from the cache" in stats[0] and "0 from the cache" not in stats[1] and "0 from the cache" in stats[2]
    assert "[conversation reset]" in proc.stderr


def test_cli_eval(tiny_bundle, perturbed_bundle, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The capital of France is Paris. " * 10)
    proc = cli("eval", str(tiny_bundle), "--text", str(text), "--reference", str(perturbed_bundle), "--json")
    assert proc.returncode == 0, proc.stderr
    want = evaluate(runtime.load(tiny_bundle), text.read_text(), reference=runtime.load(perturbed_bundle))
    got = json.loads(proc.stdout)
    assert got["top1_agreement"] == want["top1_agreement"] < 1 and got["mean_kl"] == pytest.approx(want["mean_kl"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "{b}", ""], "error: the prompt is empty"),
        (
            ["generate", "{b}", "hi", "--threads", "0"],
            "Error: Invalid value for '--threads': '0': give a count of 1 or more, e.g. 2",
        ),
        (["generate", "{b}", "hi", "--temperature", "-1"], "error: --temperature is -1.0"),
        (["eval", "{b}", "--text", "/nonexistent.txt"], "error: /nonexistent.txt: no such text file"),
    ],
)
def test_cli_bad_input_is_one_line(tiny_bundle, args, message):
    proc = cli(*[a.format(b=tiny_bundle) for a in args])
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_bad_bundles(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    (copy / "tokenizer.json").unlink()
    proc = cli("generate", str(copy), "hi")
    assert proc.returncode == 2 and "tokenizer.json: missing from the bundle" in proc.stderr
    shutil.copy(tiny_bundle / "tokenizer.json", copy / "tokenizer.json")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    proc = cli("generate", str(copy), "hi")
    assert proc.returncode == 2 and "bundle schema version 99, this edge-slm reads version 1" in proc.stderr
    with pytest.raises(BundleError):
        runtime.load(copy)


def test_missing_provider_falls_back_with_one_warning(tiny_bundle, caplog):
    from edge_slm.runtime import session as session_module

    session_module._warned.discard("CUDAExecutionProvider")
    with caplog.at_level("WARNING", logger="edge_slm.runtime"):
        first = runtime.load(tiny_bundle, providers=["CUDAExecutionProvider"], verify=False)
        runtime.load(tiny_bundle, providers=["CUDAExecutionProvider"], verify=False)
    warnings = [r.getMessage() for r in caplog.records if "CUDAExecutionProvider" in r.getMessage()]
    assert warnings == [
        "CUDAExecutionProvider is not available in this onnxruntime build; using CPUExecutionProvider instead"
    ]
    assert first.session.providers == ["CPUExecutionProvider"]


def test_threads_and_providers_default_to_the_profile(tiny_bundle):
    model = runtime.load(tiny_bundle, verify=False)
    assert model.session.session.get_session_options().intra_op_num_threads == 2  # x86-laptop: threads = 2
    with pytest.raises(EdgeSlmError, match="threads is 0; use 1 or more"):
        runtime.load(tiny_bundle, threads=0)


def test_too_old_onnxruntime_is_refused_naming_both_versions(tiny_bundle, tmp_path):
    import onnxruntime

    assert (
        json.loads((tiny_bundle / "manifest.json").read_text())["min_onnxruntime"] == "1.24.0"
    )  # GQA with position_ids
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["min_onnxruntime"] = "99.0.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=rf"needs onnxruntime >= 99.0.0, this device has {onnxruntime.__version__}"):
        runtime.load(copy)


def test_cpu_feature_mismatch_warns_once(caplog):
    from edge_slm.core.manifest import DeviceRecord, ProfileRecord, RuntimeSettings
    from edge_slm.core.system import cpu_flags
    from edge_slm.runtime.cpu import missing_features, warn_if_mismatched

    pi4 = "processor : 0\nFeatures : fp asimd evtstrm crc32 cpuid\nCPU part : 0xd08\n"
    cpu = RuntimeSettings(("CPUExecutionProvider",), 4)
    rpi5 = ProfileRecord("rpi5", cpu, DeviceRecord("aarch64", ("neon", "asimd", "asimddp", "fphp")))
    assert cpu_flags(pi4) == {"fp", "asimd", "evtstrm", "crc32", "cpuid"}
    assert missing_features(rpi5.device, "aarch64", cpu_flags(pi4)) == ["asimddp", "fphp"]
    assert missing_features(rpi5.device, "x86_64", {"avx2"}) == ["arch aarch64 (this is x86_64)"]
    with caplog.at_level("WARNING", logger="edge_slm.runtime"):
        warn_if_mismatched(rpi5, "aarch64", cpu_flags(pi4))
        warn_if_mismatched(rpi5, "aarch64", cpu_flags(pi4))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "built for rpi5, but this CPU lacks asimddp, fphp" in messages[0]
    assert "build for rpi4" in messages[0]
    laptop = DeviceRecord("x86_64", ("avx2", "fma"))
    assert missing_features(laptop, "x86_64", {"avx2", "fma", "sse4_2"}) == []


def test_a_smaller_kv_cache_gives_the_same_greedy_tokens(tiny_bundle):
    """`context` sizes the KV cache below the bundle's context: the same tokens while they fit,
    a full context past it, and a bad size refused."""
    full = runtime.load(tiny_bundle, threads=1)
    small = runtime.load(tiny_bundle, threads=1, context=32)
    assert small.context_length == 32 and small.session.kv_shape[2] == 32 and full.session.kv_shape[2] == 128
    ids = full.encode("The capital of France is")
    want = full.generate(ids, max_new_tokens=64, temperature=0.0)
    got = small.generate(ids, max_new_tokens=64, temperature=0.0)
    assert got.token_ids == want.token_ids[: len(got.token_ids)] and len(got.token_ids) >= 32 - len(ids)
    assert got.stop_reason == ("eos" if len(got.token_ids) == len(want.token_ids) else "context_full")
    with pytest.raises(EdgeSlmError, match=r"context is 500; use 2 to 128 tokens"):
        runtime.load(tiny_bundle, context=500)
