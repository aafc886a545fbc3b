# Two commands on a fresh machine (Python 3.11, pip, gcc):
#   make demo   -> .venv + project + data, then train -> calibrate -> export -> run -> energy on digits
#   make test   -> .venv + project + test deps, then the test suite
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/demo

.PHONY: venv install demo test clean bench-peers

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	bash scripts/install.sh $(VENV)

demo: install
	bash scripts/demo.sh $(VENV) $(RUN)

test: install
	$(BIN)/python -m pytest tests

# SpikingJelly 2.0.0 (--no-deps) for benchmarks/peer_speed.py
bench-peers: $(BIN)/python
	bash scripts/install_peers.sh $(VENV)

clean:
	rm -rf runs .pytest_cache
