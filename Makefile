# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
ARGS ?=

.PHONY: bootstrap system web helm chart test unit lint typecheck format lock audit demo stack-up stack-down stack-status clean

bootstrap: system $(VENV)/.installed web helm

system:
	@deploy/bootstrap.sh system

## The web UI's pinned JS (npm ci, copied to web/static/vendor) and Debian's Chromium.
web:
	@deploy/bootstrap.sh web

## helm for the chart's checks, built once with `go install` into .tools/bin (git-ignored).
helm:
	@deploy/bootstrap.sh helm

## The Helm chart (deploy/helm/carrara): helm lint --strict, helm template with the default and the
## production values, every manifest validated offline against the Kubernetes schemas, and the
## hardening asserted on the rendered objects (seconds).
CHART_TEST := $(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/test_helm_chart.py
chart: $(VENV)/.installed helm
	$(CHART_TEST)

## Third-party packages come from requirements-dev.lock only (pinned, hashes checked).
$(VENV)/.installed: pyproject.toml requirements-dev.lock
	deploy/bootstrap.sh python
	@touch $@

LOCK := $(BIN)/uv pip compile pyproject.toml --generate-hashes --universal --python-version 3.11 --quiet
## Re-lock after changing pyproject.toml's dependencies: the pins already locked are kept unless a
## new floor needs otherwise (`make lock ARGS=--upgrade` moves everything to the latest releases).
lock: $(VENV)/.installed
	$(LOCK) --extra dev $(ARGS) -o requirements-dev.lock
	$(LOCK) $(ARGS) -o requirements.lock
	deploy/bootstrap.sh python

## Known vulnerabilities in the locked packages (pip-audit; needs its vulnerability database online,
## so it is not part of `make test` or CI).
audit: $(VENV)/.installed
	$(BIN)/pip-audit --progress-spinner off --strict --disable-pip -r requirements-dev.lock

## Lint, then the whole test suite against a real local stack (started and stopped as needed).
test: bootstrap lint
	$(BIN)/carrara stack exec -- $(BIN)/python -m pytest $(PYTEST_ARGS)

## The fast tests: pure logic, no service needed (seconds, not minutes).
unit: $(VENV)/.installed helm
	$(BIN)/python -m pytest tests/unit -q $(PYTEST_ARGS)

## Ruff, the import contracts of docs/architecture.md (.importlinter), the type checker, the chart.
lint: $(VENV)/.installed helm
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/basedpyright
	$(CHART_TEST)

## basedpyright alone (basic mode, [tool.basedpyright] in pyproject.toml) over platform/carrara.
typecheck: $(VENV)/.installed
	$(BIN)/basedpyright

format: $(VENV)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## The platform in the foreground with its endpoints printed; Ctrl-C stops what it started.
demo: bootstrap
	$(BIN)/carrara demo $(ARGS)

stack-up: bootstrap
	$(BIN)/carrara stack up

stack-down: $(VENV)/.installed
	$(BIN)/carrara stack down

stack-status: $(VENV)/.installed
	$(BIN)/carrara stack status

clean: stack-down
	rm -rf .carrara
