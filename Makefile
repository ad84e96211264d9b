# The README's quick start: `make demo` (a tiny fine-tune on this machine) and `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# DeepSpeed compiles its CPU ops on first use; keep them between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# The venv first on PATH: Ray job entrypoints and DeepSpeed's op builds then find the venv's
# tools (two different `ninja`s hash the same build differently and rebuild it each time).
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export RAY_DEDUP_LOGS := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test test-fast crds bench clean kubestack cluster

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a looser pin pulls a multi-GB CUDA build on a CPU machine.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[trainer,operator,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/finetune make-tiny .demo
	$(BIN)/finetune run examples/tiny-cpu.yaml

test: $(STAMP) kubestack
	$(BIN)/pytest -p no:cacheprovider

# The real control plane (etcd, kube-apiserver, controller-manager, scheduler, KubeRay) that
# tests/realkube runs on, built from their Go modules into .cache/kubestack/bin (a warm run
# builds nothing).
kubestack:
	bash kubestack/build.sh >/dev/null

# Start that control plane on loopback; prints the admin kubeconfig. Ctrl-C stops it.
cluster: $(STAMP) kubestack
	$(BIN)/python -m finetune_testbed.kubestack

test-fast: $(STAMP)
	$(BIN)/pytest -p no:cacheprovider -m "not e2e and not training"

# Regenerate everything derived from api/finetune_api/schema.py.
crds: $(STAMP)
	$(BIN)/finetune crd --write crds $(wildcard charts/finetune-operator/crds)
	$(BIN)/finetune docs --write docs/spec-reference.md

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf .demo .cache
