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

# The serving benchmarks (~30 min); strategies and evals: see README "Measured".
bench: install
	.venv/bin/python loadtests/bench_passthrough.py
	.venv/bin/python loadtests/bench_lora.py
