# Every target sets up what it needs: a virtual environment in .venv with torch (the CPU wheel,
# pinned), the test tools, and the C++ extension built against that torch.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
CSRC := $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: build test demo timing bench bench-comm clean

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

test: build
	$(PY) -m pytest tests

demo: build
	$(PY) -m fastprox $(ARGS)

timing: build
	$(PY) -m fastprox.timing

bench: build
	$(PY) -m pytest bench --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

# communication of one proximal step on a sharded GPT-2-small-shaped model (2 gloo ranks)
bench-comm: build
	$(PY) bench/comm_distributed.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info fastprox/*.so demo-out
