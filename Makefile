# The two commands of the README: `make test` and `make demo`. Each sets up .venv by itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned for our own environments only (a CPU wheel of 2.13.0 is on the build machines);
# the package itself accepts torch>=2.1.
TORCH_PIN ?= torch==2.13.0

.PHONY: test demo build bench peer clean sanitize gpu-check

$(VENV)/.deps: requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -r requirements-dev.txt
	touch $@

# Editable install: runs setup.py -> CMake -> the native extension (and its CUDA part when nvcc is found).
build: $(VENV)/.deps
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import centered_merge, json; print(json.dumps(centered_merge.build_info(), indent=1))"

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) -m centered_merge lab --profile demo --out lab_out

# Benchmarks (not part of make test): CART SVD speed, the native kernels, the streaming engine.
bench: build
	$(PY) bench/bench_cart_speed.py
	$(PY) bench/bench_kernels.py
	$(PY) bench/bench_engine.py --T 4 --size-gb 1 --methods weight_average cart

# Parity with mergekit itself (not part of make test): its own venv with the pinned mergekit of
# bench/peer/requirements.txt, our package from this checkout (the extension built by `build`).
PEER_VENV := bench/peer/.venv
$(PEER_VENV)/.deps: bench/peer/requirements.txt
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install -q "$(TORCH_PIN)"
	$(PEER_VENV)/bin/pip install -q -r bench/peer/requirements.txt
	touch $@

peer: build $(PEER_VENV)/.deps
	PYTHONPATH=$(CURDIR) $(PEER_VENV)/bin/python bench/peer/run_peer.py

# The sanitizer job: the extension built with ASan + UBSan (out of tree, CPU kernels) runs the kernel and binding
# tests (about 3 minutes here; .ci/run calls it after make test).
sanitize: $(VENV)/.deps
	PY=$(PY) .ci/sanitize.sh

# On a machine with an NVIDIA GPU: build with the CUDA kernels, run every CUDA test, the kernel benchmark and a
# CART merge benchmark on the device, one summary (bench/gpu_check.sh). Fails at once, saying so, without a GPU.
gpu-check: $(VENV)/.deps
	PY=$(PY) bench/gpu_check.sh

clean:
	rm -rf build $(VENV) *.egg-info centered_merge/*.so
