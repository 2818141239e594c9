# The two commands a newcomer needs: `make serve` and `make test`.
.PHONY: install serve test prepare bench

install:
	bash scripts/install.sh

prepare: install
	.venv/bin/steer models prepare

serve: install
	.venv/bin/steer serve

test: install
	bash scripts/check.sh

bench: install
	.venv/bin/python loadtests/bench_passthrough.py
