# genrec — developer commands. `make setup` then `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

# Which torch to install: keep one already in the venv (e.g. a cluster's CUDA build); on a machine with an
# NVIDIA driver take the default (CUDA) wheel; elsewhere the CPU wheel (2.13.0 lies on disk here, so naming
# it in the same pip call as the project avoids a multi-GB CUDA download). Override: make setup TORCH_SPEC=...
TORCH_SPEC ?= $(shell \
  if [ -x $(PY) ] && $(PY) -c "import torch" >/dev/null 2>&1; then echo ""; \
  elif command -v nvidia-smi >/dev/null 2>&1; then echo "torch>=2.4"; \
  else echo "torch==2.13.0"; fi)

.PHONY: setup test test-fast demo bench lint clean

setup:
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]" $(TORCH_SPEC)
	@# precompiled bytecode: first imports of torch/transformers/lightning are several times slower without it
	$(PY) -m compileall -q -j 0 genrec lightning_modules datamodules callbacks runners bench >/dev/null
	$(PY) -c "import torch, lightning, transformers, sentence_transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

test:
	$(PY) -m pytest -n 2 -p no:cacheprovider tests

test-fast:
	$(PY) -m pytest -x -n 2 -p no:cacheprovider -m "not slow" tests

demo:
	$(PY) -m genrec demo

bench:
	@mkdir -p bench/results
	@for b in bench/*.py; do n=$$(basename $$b .py); case $$n in _*) continue;; esac; \
	  echo "== $$b"; $(PY) $$b --out bench/results/$$n.json || exit 1; done

lint:
	$(PY) -m ruff check genrec lightning_modules datamodules callbacks tests bench

clean:
	rm -rf $(VENV) .cache bench/results
