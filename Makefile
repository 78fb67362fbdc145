# m3w: `make demo` and `make test` each install what they need first, so each is one command on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines: torch==2.13.0 (a CPU wheel where the package index provides one). GPU machines: override, e.g.
# `make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
# uv installs (tools/uv_install.py: parallel downloads, from the package sources pip is configured with).
TORCH_SPEC ?= torch==2.13.0
# `make demo` needs torch and the package; `make test` (setup) also the dev extra (pytest, ruff, moto, s3fs).
RUNTIME_STAMP := $(VENV)/.m3w-runtime
STAMP := $(VENV)/.m3w-installed
export RAY_USAGE_STATS_ENABLED := 0
export NO_ALBUMENTATIONS_UPDATE := 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# The install does not byte-compile site-packages (tools/uv_install.py): Python writes the bytecode of the modules
# a run imports, once, which a PYTHONDONTWRITEBYTECODE in the environment would make every process redo.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup test demo demo-lm demo-screenshot bench lint clean

setup: $(STAMP)

# Reinstalled when the compiled DOM walk's source changes too (an editable install compiles it once).
$(RUNTIME_STAMP): pyproject.toml setup.py m3w/pipeline/html_walk.pyx
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python tools/uv_install.py $(TORCH_SPEC)
	$(BIN)/python tools/uv_install.py -e .
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(BIN)/python tools/uv_install.py -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# Exits non-zero when the demo's own verdict fails (and says which check).
demo: $(RUNTIME_STAMP)
	$(BIN)/python -m m3w.demo.run --out demo-out

# Remakes the frozen LM the package ships (m3w/demo/assets/lm): a demo run that pretrains one on its own corpus
# (about 4.5 minutes more) and passes its verdict with it, then that LM copied into the package.
demo-lm: $(RUNTIME_STAMP)
	$(BIN)/python -m m3w.demo.run --out demo-out --pretrain-lm
	$(BIN)/python -m m3w.demo.lm --bundle demo-out/lm/lm

# The demo report as a browser shows it, in headless Chromium (apt-get install chromium): demo-out/report.png
demo-screenshot: $(RUNTIME_STAMP)
	$(BIN)/python -m m3w.demo.screenshot demo-out/report.html demo-out/report.png

# The anchors bench/model_step.py measures against, kept out of .venv (bench/images.py makes its img2dataset venv).
OPENFLAMINGO := .venv-openflamingo/open_flamingo
$(OPENFLAMINGO):
	$(BIN)/python -m pip install --quiet --no-deps --target .venv-openflamingo open-flamingo==2.0.1 einops einops-exts

bench: setup $(OPENFLAMINGO)
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/replay.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/images.py
	$(BIN)/python bench/shards.py
	$(BIN)/python bench/model_step.py
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/eval_speed.py

lint: setup
	$(BIN)/ruff check m3w tests bench tools
	$(BIN)/ruff format --check m3w tests bench tools

clean:
	rm -rf $(VENV) .venv-img2dataset .venv-openflamingo demo-out bench-out
	rm -f m3w/pipeline/html_walk.c m3w/pipeline/html_walk.*.so  # the compiled walk's in-place build
