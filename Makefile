# Development entry points. `make demo` and `make test` build the environment themselves.
PYTHON ?= python3
VENV := .venv
# The torch release the tests run on, and pyproject.toml's floor (tests/test_packaging.py).
TORCH_VERSION := 2.13.0
# Where pip takes torch from. Empty: pip's configured indexes, whose build depends on them (PyPI's
# Linux x86_64 wheel is the CUDA build); https://download.pytorch.org/whl/cpu gives the CPU build.
TORCH_INDEX ?=
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# The VM's allocator hands big blocks back to the OS after each use; keeping them is 2x faster.
export MALLOC_MMAP_MAX_ := 0
export MALLOC_TRIM_THRESHOLD_ := 100000000000

.PHONY: venv data frost demo test test-fast lint bench dist wheel-smoke clean

$(VENV)/.installed: pyproject.toml
	@echo "setting up $(VENV): torch $(TORCH_VERSION), then the package (editable) with its test extra (a minute or two)"
	$(PYTHON) -m venv $(VENV)
	# Pinned first, so that the package's torch>=2.13 is already met: unpinned, pip would take the
	# newest release (on PyPI for Linux x86_64, a multi-GB CUDA build).
	$(VENV)/bin/pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Debian's package installs the real Fashion-MNIST files (needs root, or sudo); where it cannot
# (no apt-get, no sudo), `dropcluster download fashion-mnist` fetches the official files into the
# data folder ($DROPCLUSTER_DATA, else ~/.cache/dropcluster/data), where the loader looks next.
FASHION_MNIST_DOWNLOADED = $${DROPCLUSTER_DATA:-$$HOME/.cache/dropcluster/data}/fashion-mnist/train-images-idx3-ubyte.gz
data: venv
	@test -f $(FASHION_MNIST) || test -f "$(FASHION_MNIST_DOWNLOADED)" || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  { command -v apt-get >/dev/null && $$SUDO apt-get update -qq \
	    && $$SUDO apt-get install -y -qq dataset-fashion-mnist; } \
	  || $(VENV)/bin/dropcluster download fashion-mnist; }

# Frost's six images (data files of the corruption scripts, not shipped in this package) from
# the imagecorruptions wheel on the package index, checked against their SHA-256 and put in
# the data folder; download_frost_images() fetches the same files from GitHub instead.
FROST_WHEEL := imagecorruptions==1.1.2
frost: venv
	@$(PY) -c "from dropcluster.data.frost_images import find_frost_folder; find_frost_folder()" \
	  2>/dev/null || { tmp=$$(mktemp -d) && \
	  $(VENV)/bin/pip download --quiet --no-deps --dest $$tmp $(FROST_WHEEL) && \
	  $(PY) -m zipfile -e $$tmp/*.whl $$tmp/wheel && \
	  $(PY) -c "import sys; from dropcluster.data.frost_images import download_frost_images; \
	    print('frost images in', download_frost_images(url='file://' + sys.argv[1] + '/'))" \
	    $$tmp/wheel/imagecorruptions/frost; status=$$?; rm -rf $$tmp; exit $$status; }

# The main job at demo scale: `dropcluster reproduce` (demo preset) -> runs/demo/report/report.md.
# Two runs at a time, one thread each: 8 % faster than one run on two threads on a 2-core VM.
# Rerunning continues an interrupted demo; `rm -rf runs/demo` starts over.
demo: venv data
	$(VENV)/bin/dropcluster reproduce --preset demo --out runs/demo --jobs 2

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks examples tools
	$(VENV)/bin/ruff format --check src tests benchmarks examples tools

# Two pytest workers (pytest-xdist), one torch thread each (tests/conftest.py): 1.45x faster
# than one process on two threads on the 2-core VM. TEST_WORKERS=1 runs in one process.
TEST_WORKERS ?= 2
test: venv data frost lint
	$(PY) -m pytest -q $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS))

# The edit-test loop: the core (ReNA, Spatial Hopkins, the layers and their functional forms,
# attach and fitting), the models, the data pipeline, corruptions, the results store and the
# command line's parsing, in well under a minute. `make test` stays the whole suite.
FAST_TESTS := rena hopkins dropcluster_layer dropblock stochastic_depth schedule registry attach api_shape \
	fitting models cli docs_match_code data_augment data_subsets data_loader store corruptions \
	corruptions_colour corruptions_weather corruptions_jpeg_elastic robustness
test-fast: venv data frost
	$(PY) -m pytest -q $(FAST_TESTS:%=tests/test_%.py)

bench: venv data
	$(VENV)/bin/pip install --quiet -e '.[test,bench]'
	$(PY) benchmarks/bench_rena.py
	$(PY) benchmarks/bench_layers.py
	$(PY) benchmarks/bench_dropcluster_versions.py
	$(PY) benchmarks/check_dropblock_rate.py
	$(PY) benchmarks/bench_stochastic_depth.py
	$(PY) benchmarks/bench_train.py

# The sdist and the wheel, in dist/ (emptied first, so that it holds this version's only).
dist: venv
	rm -rf dist
	$(PY) -m build --quiet --outdir dist .

# The wheel on its own: a fresh venv outside the checkout, torch $(TORCH_VERSION), the wheel with
# its data and plot extras, then the command, a preset's dry run and a tiny training run.
wheel-smoke: dist
	TORCH_VERSION=$(TORCH_VERSION) TORCH_INDEX=$(TORCH_INDEX) $(PYTHON) tools/wheel_smoke.py dist

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
