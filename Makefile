# Two commands on a fresh machine: `make demo` (train the CPU demo) and `make test`.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build this project is developed and tested with; override for another machine,
# e.g. make test TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# CIFAR-10 for the demo: $FASTSWAV_SHARED_DATA/cifar10-jpeg.zip (a zip of JPEGs, read
# offline) where that variable names a folder holding one, else the preset's default
# (torchvision's CIFAR-10, downloaded once into ~/.cache/fastswav/data).
# `make demo DATA=/path/to/cifar10-jpeg.zip` for another copy.
CIFAR10_ZIP_SHARED := $(if $(FASTSWAV_SHARED_DATA),$(wildcard $(FASTSWAV_SHARED_DATA)/cifar10-jpeg.zip))
DATA ?= $(or $(CIFAR10_ZIP_SHARED),download:cifar10)
PYTEST_ARGS ?=
# The data tests read CIFAR-10 as a zip of JPEGs, cifar10-jpeg.zip, from $FASTSWAV_SHARED_DATA
# when set (CI sets it: .ci/run), else from .data/. Where the zip is missing, `make test`
# writes it from torchvision's CIFAR-10 (downloaded once).
TEST_DATA ?= $(or $(FASTSWAV_SHARED_DATA),.data)
# FFCV (the decode-once loader, its tests and benchmarks; not the demo) builds from source
# against these Debian packages.
FFCV_SPEC ?= ffcv==1.0.2
FFCV_DEBS := pkg-config libturbojpeg0-dev libopencv-dev

.PHONY: install ffcv demo test clean compat-install compat-test

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

# Written only where missing (never over the zip beside the repository).
%/cifar10-jpeg.zip: | $(VENV)/.installed
	$(PY) tests/make_cifar10_zip.py $@

test: install ffcv $(TEST_DATA)/cifar10-jpeg.zip
	@$(PY) -c "import fastswav._C" 2>/dev/null || { \
	  echo "fastswav._C does not load in $(VENV) (built for another torch): rebuilding it"; \
	  rm -f fastswav/_C*.so; $(PY) -m pip install -q --no-build-isolation --no-deps -e .; }
	FASTSWAV_SHARED_DATA=$(TEST_DATA) $(PY) -m pytest $(PYTEST_ARGS)

# --- The oldest versions supported: torch 2.11, torchvision 0.26, triton 3.6 (no ffcv, no nvtx) ---
# `make compat-test` builds $(COMPAT_VENV) with them and runs the quick tests (-m "not slow").
# Python: whatever $(PYTHON) is (the package supports 3.10 to 3.12).
# numpy: below 2.4, because triton 3.6's interpreter (TRITON_INTERPRET=1, how the kernels run
# without a GPU) fails on numpy >= 2.4 ("only 0-dimensional arrays can be converted to Python
# scalars"); on a GPU, where only the compiled kernels run, numpy 2.5 works.
# PIP_CONSTRAINT=/dev/null: a pip constraint set elsewhere (pip's config or the environment)
# must not hold this venv to the main venv's torch. An empty PIP_CONSTRAINT= does not do it:
# pip then still applies the configured file.
# Smallest install that imports and runs on the CPU: torch, torchvision and triton with
# --no-deps, torch's Python deps, and only the CUDA libraries that libtorch_cuda.so links
# (readelf NEEDED: cudart, cupti, cublas(Lt), cufft, cufile, curand, cusparse (+nvjitlink),
# cusparseLt, nccl, cudnn, nvshmem) at the versions torch 2.11.0 pins. Left out: cusolver,
# nvrtc and nvtx wheels, cuda-bindings, cuda-toolkit (loaded lazily or not at all on the
# CPU). Without the linked ones `import torch` fails (libcudnn.so.9: cannot open shared
# object file): a --no-deps torch alone does not import. There is no 2.11 CPU-only wheel
# on PyPI. It takes about 4.3 GB of disk (the full dependency set: 4.7 GB).
COMPAT_VENV ?= .venv-compat
CPY := $(COMPAT_VENV)/bin/python
COMPAT_PIP := PIP_CONSTRAINT=/dev/null $(CPY) -m pip install -q
COMPAT_TORCH_SPEC ?= torch==2.11.0 torchvision==0.26.0 triton==3.6.0
COMPAT_NUMPY ?= numpy>=2.3,<2.4
COMPAT_TORCH_DEPS ?= filelock typing-extensions>=4.10.0 setuptools<82 sympy>=1.13.3 \
  networkx>=2.5.1 jinja2 fsspec>=0.8.5 pillow
COMPAT_CUDA_LIBS ?= nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85 \
  nvidia-cublas==13.1.0.3 nvidia-cufft==12.0.0.61 nvidia-cufile==1.15.1.6 \
  nvidia-curand==10.4.0.35 nvidia-cusparse==12.6.3.3 nvidia-nvjitlink==13.0.88 \
  nvidia-cusparselt-cu13==0.8.0 nvidia-nccl-cu13==2.28.9 nvidia-cudnn-cu13==9.19.0.56 \
  nvidia-nvshmem-cu13==3.4.5
# fastswav's own deps and the test extra, without nvtx (optional) and with
# timm --no-deps (its torch requirement would otherwise pull every CUDA wheel).
COMPAT_DEPS ?= tqdm>=4.60 pytest>=7 matplotlib>=3.5 tensorboard>=2.10 huggingface_hub \
  pyyaml safetensors

$(COMPAT_VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*)
	rm -rf $(COMPAT_VENV)
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PIP) --upgrade pip setuptools wheel
	$(COMPAT_PIP) --no-deps $(COMPAT_TORCH_SPEC) $(COMPAT_CUDA_LIBS)
	$(COMPAT_PIP) '$(COMPAT_NUMPY)' $(foreach d,$(COMPAT_TORCH_DEPS) $(COMPAT_DEPS),'$(d)')
	$(COMPAT_PIP) --no-deps 'timm>=0.9'
	FASTSWAV_NO_CUDA_EXT=1 $(COMPAT_PIP) --no-build-isolation --no-deps -e .
	$(CPY) -c "import torch, torchvision, triton, numpy, fastswav._C; print('compat venv: torch', torch.__version__, 'torchvision', torchvision.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
	touch $@

compat-install: $(COMPAT_VENV)/.installed

# The editable install builds fastswav/_C*.so in place, in this tree, for one torch: .venv and
# $(COMPAT_VENV) share that file, so whichever target runs checks that it loads and rebuilds
# it for its own torch when it does not (`make test` after `make compat-test` and back).
compat-test: compat-install
	@$(CPY) -c "import fastswav._C" 2>/dev/null || { \
	  echo "fastswav._C does not load in $(COMPAT_VENV) (built for another torch): rebuilding it"; \
	  rm -f fastswav/_C*.so; FASTSWAV_NO_CUDA_EXT=1 $(COMPAT_PIP) --no-build-isolation --no-deps -e .; }
	$(CPY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info
