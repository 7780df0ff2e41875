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

SWEEP ?= sweeps/digits_alpha.yaml

.PHONY: install demo sweep test test-all lint bench bench-sweep ui clean-data \
	docker-build docker-run docker-push

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

sweep: install
	$(BIN)/rmctl sweep $(SWEEP)

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
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python bench/run_all.py

bench-sweep: install
	$(BIN)/python bench/sweep_overhead.py

# Docker images and the compose cluster (docker/README.md). None of these
# targets needs the virtual environment.
IMAGE ?= resmom
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
COMPOSE := docker compose -f docker/compose.yaml
# Ray worker containers that docker-run starts; one per host takes all its GPUs.
RAY_WORKERS ?= 1
# The data folder that an existing cluster's nodes see at the same path.
DATA_DIR ?= $(CURDIR)/data

docker-build:
	docker build -f docker/Dockerfile --build-arg VERSION=$(VERSION) \
		-t $(IMAGE):$(VERSION) -t $(IMAGE):latest .

# With RAY_ADDRESS and MLFLOW_TRACKING_URI set, the sweep driver joins that
# cluster from a container on the host network, so that the cluster's nodes
# can reach the raylet that it starts. It runs as the calling user, so that
# the files it writes into DATA_DIR belong to that user. Without the two
# variables, the compose cluster is started (or kept) and the sweep runs in
# its sweep service. Both need the image from docker-build.
docker-run:
	$(if $(filter sweeps/%,$(SWEEP)),,$(error SWEEP must be a file under sweeps/, the folder that is mounted into the container, e.g. SWEEP=sweeps/digits_alpha.yaml, but it is '$(SWEEP)'))
	$(if $(wildcard $(SWEEP)),,$(error sweep spec not found: '$(SWEEP)'))
ifneq ($(and $(RAY_ADDRESS),$(MLFLOW_TRACKING_URI)),)
	docker run --rm --init --network host --entrypoint ray-driver \
		--user "$$(id -u):$$(id -g)" -e HOME=/tmp \
		-e RAY_ADDRESS='$(RAY_ADDRESS)' -e MLFLOW_TRACKING_URI='$(MLFLOW_TRACKING_URI)' \
		-e RAY_AUTH_MODE -e RAY_AUTH_TOKEN -e RESMOM_DATA_DIR='$(DATA_DIR)' \
		-v '$(CURDIR)/sweeps:/app/sweeps:ro' -v '$(CURDIR)/jobs:/app/jobs:ro' \
		-v '$(DATA_DIR):$(DATA_DIR)' \
		$(IMAGE):$(VERSION) rmctl sweep '$(SWEEP)'
else ifneq ($(or $(RAY_ADDRESS),$(MLFLOW_TRACKING_URI)),)
	$(error set both RAY_ADDRESS and MLFLOW_TRACKING_URI to run on an existing cluster, or neither to run on the compose cluster)
else
	RESMOM_IMAGE=$(IMAGE):$(VERSION) $(COMPOSE) up -d --scale ray-worker=$(RAY_WORKERS)
	RESMOM_IMAGE=$(IMAGE):$(VERSION) $(COMPOSE) --profile sweep run --rm sweep rmctl sweep '$(SWEEP)'
endif

docker-push:
	$(if $(REGISTRY),,$(error REGISTRY is not set. Run `make docker-push REGISTRY=host[:port]/namespace`))
	docker tag $(IMAGE):$(VERSION) $(REGISTRY)/$(IMAGE):$(VERSION)
	docker tag $(IMAGE):$(VERSION) $(REGISTRY)/$(IMAGE):latest
	docker push $(REGISTRY)/$(IMAGE):$(VERSION)
	docker push $(REGISTRY)/$(IMAGE):latest
