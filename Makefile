# Two entry points: `make demo` (tiny offline VPPO run on CPU) and `make test`.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: bootstrap demo test

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	$(PY) -m megatron_vppo.cli demo

test: bootstrap
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile tests
