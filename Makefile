.DEFAULT_GOAL := help
PY ?= python3

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

dev: ## build the extension in place and install the package with its test extras (editable)
	$(PY) -m pip install -e '.[test]'

format: ## format Rust and Python sources
	cargo fmt --all
	$(PY) -m ruff format pyquant tests
	$(PY) -m ruff check --fix pyquant tests

lint: ## ruff, mypy --strict, stubtest, rustfmt --check, clippy -D warnings
	$(PY) -m ruff check pyquant tests
	$(PY) -m ruff format --check pyquant tests
	$(PY) -m mypy --strict pyquant
	$(PY) -m mypy.stubtest pyquant._core --allowlist .mypy-stubtest-allowlist
	cargo fmt --all -- --check
	cargo clippy --all-targets --all-features -- -D warnings

test: ## Rust tests (cargo test) then the Python suite (pytest)
	cargo test --workspace
	$(PY) -m pytest

FUZZ_CASES ?= 20000
FUZZ_EXAMPLES ?= 3000

fuzz: ## the engine fuzz suites with many fresh cases (FUZZ_CASES Rust, FUZZ_EXAMPLES Python)
	# A debug build on purpose: it traps every integer overflow the release build would wrap.
	PYQUANT_FUZZ_CASES=$(FUZZ_CASES) cargo test -p pyquant_core --test engine_fuzz
	PYQUANT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/property/test_engine_fuzz.py -p no:cacheprovider

chaos: ## seeded chaos soak of the daemon (kill -9, bad input, faults, flatten) in both modes
	PYTHONPATH=$(CURDIR) $(PY) tests/chaos/soak.py --steps $${STEPS:-200} --seed $${SEED:-7}

BENCH_ARGS = --benchmark-enable --benchmark-group-by=group --benchmark-columns=min,median,mean,ops,rounds

bench: ## pytest-benchmark suites, each beside its baseline; the backtest vs others on 1 core, then all
	$(PY) -m pytest tests/benchmarks $(BENCH_ARGS)
	RAYON_NUM_THREADS=1 NUMBA_NUM_THREADS=1 $(PY) -m pytest tests/benchmarks/test_bench_versus.py $(BENCH_ARGS)

SEED ?= 1
STEPS ?= 40
DAEMONS ?= 3
chaos-redis: ## seeded multi-daemon Redis soak (SEED=1 STEPS=40 DAEMONS=3; needs redis-server)
	PYTHONPATH=$(CURDIR) $(PY) tests/scale/chaos_redis.py --seed $(SEED) --steps $(STEPS) --daemons $(DAEMONS)

.PHONY: help dev format lint test fuzz bench chaos chaos-redis
