# resmom: `make demo` runs the main job, `make test` runs the suite; both
# install what they need first. A second `make install` takes seconds.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# FFCV 1.0.2 compiles against OpenCV and libjpeg-turbo found by pkg-config.
DEB_PACKAGES := pkg-config libopencv-dev libturbojpeg0-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint bench ui clean-data

install: $(STAMP)

$(STAMP): pyproject.toml
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages for FFCV: $$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: FFCV builds against it without build isolation.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 "numpy>=2.0,<2.5"
	$(BIN)/pip install -q --no-build-isolation ffcv==1.0.2
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/rmctl run jobs/digits_byol_rm.yaml

test: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check platform tests

ui: install
	$(BIN)/rmctl ui

clean-data:
	rm -rf data

bench: install
	$(BIN)/python bench/rm_overhead.py
	$(BIN)/python bench/data_pipeline.py
