# Fresh machine: `make demo` runs the main job, `make test` runs the tests. Both create (or reuse)
# the virtual environment .venv with the CPU build of torch and everything the project needs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,test]'
	# fastMRI is the tests' reference; its declared torchvision / lightning requirements would
	# pull a multi-GB CUDA torch and its code does not import them.
	$(PY) -m pip install -q --no-deps fastmri==0.3.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/spade demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
