# make quickstart: train the digits ViT on the CPU, evaluate its best checkpoint, plot curves.
# make test: the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := output/vit_tiny_patch2_32/quickstart

.PHONY: quickstart test venv clean

$(PY): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the tested torch where pip offers it (x86-64 Linux, Python 3.11), else the newest it has
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -r requirements.txt
	touch $(PY)

venv: $(PY)

quickstart: $(PY)
	# a 0.2M-parameter model: one thread is as fast as two and immune to a busy machine
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) main.py --cfg configs/quickstart.yaml --tag quickstart
	bash evaluate.sh 1 configs/quickstart.yaml $(RUN)/ckpt_best.pth
	$(PY) tools/plot_curves.py $(RUN)/metrics.jsonl -o $(RUN)/curves.png

test: $(PY)
	$(PY) -m pytest -q tests

clean:
	rm -rf output
