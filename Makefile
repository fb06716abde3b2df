# Two commands do all set-up on a fresh Debian 12 machine with Python 3.11: `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
.PHONY: help env demo ui serve test lint sample clean slurm-up slurm-down

help:
	@echo "make demo   install, generate and serve the sample web, run the whole graph, print the summary"
	@echo "make ui     Dagster UI on http://127.0.0.1:3000 over the demo's lake and runs, explorer on :1234"
	@echo "make serve  the search service (clip-retrieval's API) on http://127.0.0.1:1234 over the demo's lake"
	@echo "make test   install what the tests need and run the whole suite"
	@echo "make lint   ruff + mypy"
	@echo "make slurm-up    a real single-node SLURM (+ slurmdbd, sshd on 127.0.0.1) for the SLURM tests"
	@echo "make slurm-down  stop it; eval \"\$$(scripts/slurm.sh env)\" exports its settings"

env: .venv/.synced

.venv/.synced: pyproject.toml uv.lock scripts/bootstrap.sh
	scripts/bootstrap.sh
	@touch $@

sample: env
	@source scripts/common.sh && ensure_sample

demo: env
	scripts/demo.sh

ui: env
	scripts/ui.sh

serve: env
	scripts/serve.sh

test: env
	scripts/test.sh -q

lint: env
	.venv/bin/ruff check curation assets resources tests benchmarks
	.venv/bin/mypy

slurm-up:
	scripts/slurm.sh up

slurm-down:
	scripts/slurm.sh down

clean:
	rm -rf .data .dagster_home
