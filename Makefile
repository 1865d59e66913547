# The README's two commands: `make demo` and `make test`. Each sets up .venv first if needed.
# `make test` skips the tests marked slow (benchmark smoke runs); `make test-all` runs everything but the `real`
# tests (CI does); `make test-real` checks a built small-real checkpoint;
# `make test-runtime` runs the suite in a runtime-only venv (no torch) against a freshly exported tiny bundle.
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/omniguard-edge
ART ?= artifacts

.PHONY: setup demo test test-all test-runtime test-real clean

setup: $(VENV)/.installed

# torch and torchvision first, as the pinned pair that installs from the machine's disk (README "Install per target");
# then the package with the CPU runtime, the export tools, the test runner, the latency benchmark's peer engine and
# the quantization tools and the service.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[cpu,export,dev,peer,quantize,serve]'
	touch $@

# Main job on the embedded default: the tiny reference checkpoint (RANDOM weights) -> validated bundle ->
# moderation of sample text, image, audio and video with per-stage timings.
demo: setup
	$(CLI) demo --workdir $(ART) --profile tiny

test: setup
	$(PY) -m pytest -q -m "not slow and not real"

test-all: setup
	$(PY) -m pytest -q -m "not real"

# Known answers of a built small-real checkpoint (OMNIGUARD_SMALL_REAL, default $(ART)/real/checkpoint): minutes.
test-real: setup
	$(PY) -m pytest -q -m real -rs

test-runtime: setup
	.ci/run runtime

clean:
	rm -rf $(ART) .venv-runtime
