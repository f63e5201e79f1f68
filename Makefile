# Two commands on a fresh machine: `make demo` (train the CPU demo) and `make test`.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build this project is developed and tested with; override for another machine,
# e.g. make test TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DATA ?= ../shared/data/cifar10-jpeg.zip
PYTEST_ARGS ?=
# FFCV (the decode-once loader, its tests and benchmarks; not the demo) builds from source
# against these Debian packages.
FFCV_SPEC ?= ffcv==1.0.2
FFCV_DEBS := pkg-config libturbojpeg0-dev libopencv-dev

.PHONY: install ffcv demo test clean

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Debian packages: apt-get only as root and only for the missing ones, else skipped quietly.
# A failed FFCV build is a warning (its tests then skip) and is tried again next time.
$(VENV)/.ffcv: $(VENV)/.installed
	@missing=""; \
	if command -v dpkg-query >/dev/null 2>&1; then \
	  for p in $(FFCV_DEBS); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	  done; \
	fi; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "apt-get install$$missing (for ffcv)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends$$missing; } >/dev/null \
	    || echo "warning: apt-get install$$missing failed"; \
	fi
	@if $(PY) -m pip install -q --no-build-isolation '$(FFCV_SPEC)'; then touch $@; \
	else echo "warning: ffcv did not install (needs$(foreach p,$(FFCV_DEBS), $(p))): its tests will be skipped"; fi

ffcv: $(VENV)/.ffcv

demo: install
	$(PY) -m fastswav.train --data $(DATA)

test: install ffcv
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
