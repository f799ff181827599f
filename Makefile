# Thin wrappers over scripts/dev.sh, which also works where make is not installed.
PY := .venv/bin/python

.PHONY: setup demo test bench bench-quick bench-probe clean

setup:
	bash scripts/dev.sh setup

demo:
	bash scripts/dev.sh demo

test:
	bash scripts/dev.sh test

bench-probe: setup
	$(PY) benchmarks/probe_speed.py

bench: bench-probe

clean:
	rm -rf .venv valfree-demo
