# Every target sets up what it needs: a virtual environment in .venv with torch (the CPU wheel,
# pinned), the test tools, and the C++ extension built against that torch.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
CSRC := $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: build test test-fast demo bench bench-gpu bench-comm compile-gate gpu-check gpu-wheels clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# No build isolation: the extension must be compiled against the torch installed above.
$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(CSRC)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

# tests/: the CPU kernels and the Python API. tests_kernels/: the Triton kernels, on a CUDA
# device when there is one, else under Triton's interpreter on CPU tensors (the variable must be
# set before triton is imported: a pytest run of its own).
# Under the interpreter (one core per process) the kernel tests are spread over TEST_JOBS
# processes with pytest-xdist (requirements-dev.txt), when it is installed.
TEST_JOBS ?= 2

test: build
	$(PY) -m pytest tests
	if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(PY) -m pytest tests_kernels; \
	else \
		if $(PY) -c "import xdist" 2>/dev/null; then JOBS="-n $(TEST_JOBS)"; else JOBS=""; fi; \
		TRITON_INTERPRET=1 $(PY) -m pytest tests_kernels $$JOBS; \
	fi

# The fast lane, for day-to-day work (a few minutes): the CPU suite, and the kernel tests on the
# C++ kernels and the reference through the dispatcher. The interpreted Triton kernels are
# `make test`'s, the compile gate `make compile-gate`'s.
test-fast: build
	$(PY) -m pytest tests -q -x
	TRITON_INTERPRET=1 FASTPROX_TEST_BACKENDS=cpp,reference $(PY) -m pytest tests_kernels -q -x

demo: build
	$(PY) -m fastprox $(ARGS)

bench: build
	$(PY) -m pytest bench --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

# The compile gate (no GPU needed): every specialization the CUDA entries launch, compiled for
# sm_90a and sm_80 with the newest Triton (in .venv) and with Triton 3.6.0 (the oldest supported,
# in a directory of its own put first on PYTHONPATH: never pinned next to a CUDA torch); fails on
# compile errors, spills and narrow accesses of aligned tiles. Tables in $(GATE_OUT)/.
TRITON_OLDEST ?= 3.6.0
TRITON_OLD_DIR ?= .venv-triton-$(TRITON_OLDEST)
GATE_OUT ?= gate-out

$(TRITON_OLD_DIR)/.installed:
	$(PY) -m pip install --quiet --no-deps --target $(TRITON_OLD_DIR) triton==$(TRITON_OLDEST)
	touch $@

compile-gate: build $(TRITON_OLD_DIR)/.installed
	mkdir -p $(GATE_OUT)
	$(PY) bench/compile_gate.py --first-call --json $(GATE_OUT)/newest.json \
		--markdown $(GATE_OUT)/newest.md $(ARGS)
	PYTHONPATH=$(TRITON_OLD_DIR) $(PY) bench/compile_gate.py --first-call \
		--json $(GATE_OUT)/triton-$(TRITON_OLDEST).json \
		--markdown $(GATE_OUT)/triton-$(TRITON_OLDEST).md $(ARGS)

# The GPU check, on a machine with CUDA and its own python3 holding torch and Triton (no venv,
# no network): build, kernel tests on CUDA, compute-sanitizer, benchmark; results in gpu-out/.
gpu-check:
	bash bench/gpu_check.sh $(or $(OUT),gpu-out)

# Wheels for the GPU image, which has no network and lacks Torch-Pruning (the coupled rows of
# the GPU benchmark discover ResNet-50's channel groups with it): gpu_check.sh installs what is
# in .whl/ (send .whl along with the tree).
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 -d .whl torch-pruning==1.6.1

# the harness on CUDA: fastprox vs eager / compiled user code vs a device-to-device copy
bench-gpu: build
	$(PY) bench/gpu_kernels.py $(ARGS)

# communication of one proximal step on a sharded GPT-2-small-shaped model (2 gloo ranks)
bench-comm: build
	$(PY) bench/comm_distributed.py $(ARGS)

clean:
	rm -rf $(VENV) $(TRITON_OLD_DIR) build *.egg-info fastprox/*.so demo-out gate-out gpu-out
