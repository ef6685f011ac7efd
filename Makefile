# Development entry points. `make demo` and `make test` build the environment themselves.
PYTHON ?= python3
VENV := .venv
TORCH_VERSION := 2.13.0
# Where pip takes torch from; e.g. https://download.pytorch.org/whl/cpu where the default index
# serves the CUDA build.
TORCH_INDEX ?=
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# The VM's allocator hands big blocks back to the OS after each use; keeping them is 2x faster.
export MALLOC_MMAP_MAX_ := 0
export MALLOC_TRIM_THRESHOLD_ := 100000000000

.PHONY: venv data frost demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	@echo "setting up $(VENV): torch $(TORCH_VERSION) (CPU build) and the package with its extras (a minute or two)"
	$(PYTHON) -m venv $(VENV)
	# Pinned CPU build: an unpinned torch pulls a multi-GB CUDA build.
	$(VENV)/bin/pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Debian's package installs the real Fashion-MNIST files (needs root, or sudo).
data:
	@test -f $(FASHION_MNIST) || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }

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
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

test: venv data frost lint
	$(PY) -m pytest -q

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

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
