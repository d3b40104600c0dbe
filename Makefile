# make quickstart: train the digits ViT on the CPU, evaluate its best checkpoint, plot curves.
# make test: the test suite (make test-fast: without the slow tests), with the optional test
# dependencies of requirements-test.txt. All create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := output/vit_tiny_patch2_32/quickstart

.PHONY: quickstart test test-fast venv clean

$(PY): requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the tested versions (constraints.txt); where pip does not offer the tested torch (it does
	# on x86-64 Linux, Python 3.11), the newest torch and torchvision, the rest as tested
	if $(PY) -m pip install -q -c constraints.txt torch torchvision; then \
		$(PY) -m pip install -q -c constraints.txt -r requirements.txt; \
	else \
		$(PY) -m pip install -q torch torchvision && \
		grep -v -E '^(torch|torchvision)==' constraints.txt > $(VENV)/constraints.txt && \
		$(PY) -m pip install -q -c $(VENV)/constraints.txt -r requirements.txt; \
	fi
	touch $(PY)

venv: $(PY)

quickstart: $(PY)
	# a 0.2M-parameter model: one thread is as fast as two and immune to a busy machine
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) main.py --cfg configs/quickstart.yaml --tag quickstart
	# PYTHON: the venv's, not `make PYTHON=python3.x`'s (a command-line variable reaches the script)
	PYTHON=$(PY) bash evaluate.sh 1 configs/quickstart.yaml $(RUN)/ckpt_best.pth
	$(PY) tools/plot_curves.py $(RUN)/metrics.jsonl -o $(RUN)/curves.png

# the optional test dependencies (requirements-test.txt: the ONNX exporter and onnxruntime, which
# tests/test_export.py runs the exported file in); where pip offers no onnxruntime that test skips
TEST_DEPS := $(VENV)/.test-deps
$(TEST_DEPS): $(PY) requirements-test.txt constraints.txt
	if $(PY) -m pip install -q -c constraints.txt -r requirements-test.txt; then touch $@; \
	else echo "requirements-test.txt did not install: tests/test_export.py will skip"; fi

# the 20 slowest tests are listed last: docs/TESTING.md keeps their table
test: $(TEST_DEPS)
	$(PY) -m pytest -q --durations=20 tests

# while working: everything but the tests marked slow (docs/TESTING.md)
test-fast: $(TEST_DEPS)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf output
