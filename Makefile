# layercache — developer entry points. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TESTBED := $(PY) -m testbed.cli
BED_DIR ?= /tmp/layercache-testbed
DEMO_DIR ?= /tmp/layercache-demo
NODES ?= 3
PYTEST_ARGS ?=

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: deps
deps: ## Install the Debian packages the test bed needs (idempotent)
	@bash .ci/deps.sh

$(VENV)/.installed: pyproject.toml tests/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# The product, editable, and the test bed (`testbed`, `twins`): a package of the dev
	@# environment only (tests/pyproject.toml), never in the product's wheel or image.
	$(PY) -m pip install -q -e '.[test]' -e tests/
	@# Venvs made before the bed was a package had tests/ put on the path by a hand-written
	@# .pth file: removed, so that only the package (not all of tests/) is importable.
	rm -f "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/layercache-testbed.pth"
	@touch $@

.PHONY: venv
venv: $(VENV)/.installed ## Create the Python environment (.venv): the product and the test bed package (tests/), editable, with the test extras

.PHONY: tools
tools: ## Build the pinned Go tools (Kubernetes, etcd, helm, helm-docs, actionlint, crictl, kind, pause, containerd 2.x and 1.7, runc) into .tools/
	@bash tests/testbed/tools/build.sh

.PHONY: setup
setup: deps venv tools ## Everything the tests, the demo and the benchmarks need

.PHONY: test
test: setup ## Run every test: the product's (unit, integration on the real local test bed) and the bed's own
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: unit
unit: venv ## Run the product's unit tests only (tests/unit, no I/O)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

.PHONY: test-bed
test-bed: setup ## Run the test bed's own tests only (tests/bed: its unit and integration tests)
	$(PY) -m pytest tests/bed $(PYTEST_ARGS)

.PHONY: lint
lint: venv tools ## ruff (incl. complexity), mypy, import contracts, yamllint, helm lint (every ci/ values file), chart README current, actionlint, dashboard + alert rules
	$(VENV)/bin/ruff check operator tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/yamllint --strict -c .yamllint.yaml .
	bash .ci/lint-chart.sh
	bash .ci/chart-docs.sh --check
	.tools/bin/actionlint
	$(PY) -m testbed.observe lint

.PHONY: chart-docs
chart-docs: tools ## Regenerate helm/layercache/README.md from values.yaml comments (helm-docs)
	bash .ci/chart-docs.sh

.PHONY: bench
bench: setup ## Benchmarks against their baselines (A fan-out, B ingest, C pull after warm, D scale) -> out/bench
	$(PY) -m bench.run --out out/bench $(BENCH_ARGS)

.PHONY: image
image: deps venv ## Build the layercache image index (linux/amd64 + linux/arm64) without Docker or emulation into out/image
	$(TESTBED) image --out out/image $(IMAGE_ARGS)

.PHONY: testbed-up
testbed-up: setup ## Start the local test bed (BED_DIR, NODES) and leave it running
	$(TESTBED) up --dir $(BED_DIR) --nodes $(NODES)

.PHONY: testbed-status
testbed-status: venv ## Show each bed component; non-zero exit unless all are ready
	$(TESTBED) status --dir $(BED_DIR)

.PHONY: testbed-load
testbed-load: setup ## Build the product image (cached) and import it into every node of the bed, as kind load
	$(TESTBED) load-image --dir $(BED_DIR)

.PHONY: testbed-down
testbed-down: venv ## Stop the test bed and remove its state
	$(TESTBED) down --dir $(BED_DIR)

.PHONY: demo
demo: setup ## The main job: layercache on a local 3-node cluster with real images, and the savings
	$(TESTBED) demo --dir $(DEMO_DIR) --report out/demo-report.json

.PHONY: demo-down
demo-down: venv ## Tear the demo cluster down
	$(TESTBED) down --dir $(DEMO_DIR)

.PHONY: clean
clean: ## Remove build outputs (not the tool and image caches)
	rm -rf out build dist .pytest_cache .mypy_cache .ruff_cache
