PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean lint emoji-sources emoji-world test-latest lock

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/comp-vlm demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Drift check (not CI): a fresh venv with the newest versions pyproject.toml allows, torch kept at the lock's local
# CPU build, then the tests. `make lock` does the same and, when the tests pass, rewrites constraints.txt from it.
LATEST := .venv-latest
TORCH_PIN = $(shell grep -E '^torch==' constraints.txt)

test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	echo "$(TORCH_PIN)" > $(LATEST)/torch-only.txt
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -c $(LATEST)/torch-only.txt -e ".[dev]"
	$(LATEST)/bin/pip freeze --exclude-editable | grep -iE '^(torch|transformers|tokenizers|safetensors|numpy|huggingface)'
	$(LATEST)/bin/python -m pytest -q

lock: test-latest
	{ sed -n '/^#/p' constraints.txt; $(LATEST)/bin/pip freeze --exclude-editable | sed 's/+cpu//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	git diff --stat constraints.txt || true

# The emoji world (README "Datasets"): three Debian packages, then the Karpathy, NLVR2 and VQAv2 datasets.
EMOJI_WORLD ?= data/emoji-world
# processes drawing the world (the same files, byte for byte, with any number; 1 where nproc is missing)
EMOJI_WORKERS ?= $(shell nproc 2>/dev/null || echo 1)
EMOJI_PACKAGES := fonts-noto-color-emoji unicode-cldr-core unicode-data
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

emoji-sources:
	dpkg -s $(EMOJI_PACKAGES) >/dev/null 2>&1 || \
		($(SUDO) apt-get update && $(SUDO) apt-get install -y $(EMOJI_PACKAGES))

emoji-world: $(STAMP) emoji-sources
	$(BIN)/python -m comp_vlm.data.emoji_world $(EMOJI_WORLD) --workers $(EMOJI_WORKERS)

lint: $(STAMP)
	$(BIN)/ruff check comp_vlm tests benchmarks

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache runs
