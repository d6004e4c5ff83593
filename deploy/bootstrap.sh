#!/usr/bin/env bash
# Installs what Carrara needs on a fresh Debian machine, and nothing that is already there.
#   deploy/bootstrap.sh system   Debian packages: PostgreSQL, Redis, Java 17, Maven
#   deploy/bootstrap.sh python   the virtualenv in .venv: the locked packages (requirements-dev.lock,
#                                hashes checked) and Carrara itself
#   deploy/bootstrap.sh web      the web UI's JS (npm ci, copied to web/static/vendor) and
#                                Debian's Chromium for the browser tests
#   deploy/bootstrap.sh helm     helm (HELM_VERSION), built from the Go module proxy into .tools/bin,
#                                for the Helm chart's checks (deploy/helm)
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

system_packages() {
  local missing=()
  compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || missing+=(maven)
  command -v curl >/dev/null || missing+=(curl)  # the README's snippets use it
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}"
  fi
}

# Every third-party package comes from requirements-dev.lock, pinned with its hashes (pip refuses
# anything else); only Carrara itself is installed from this checkout. `make lock` re-locks after a
# change to pyproject.toml's dependencies.
python_env() {
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  local stamp="$VENV/.lock-installed"
  if [ -f "$stamp" ] && cmp -s "$stamp" <(cat requirements-dev.lock pyproject.toml); then
    return 0  # this lock and pyproject.toml are what is installed: nothing to do
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --require-hashes \
    -r requirements-dev.lock
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
  cat requirements-dev.lock pyproject.toml >"$stamp"
}

web_assets() {
  local missing=()
  command -v npm >/dev/null || missing+=(nodejs npm)
  # Browser tests drive Debian's Chromium; `playwright install` (a downloaded browser) is never used.
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}"
  fi
  # The pinned JS (web/package-lock.json) is served by the app itself, never from a CDN.
  if [ ! -f web/node_modules/.package-lock.json ] \
    || [ web/package-lock.json -nt web/node_modules/.package-lock.json ]; then
    (cd web && npm ci --no-audit --no-fund --loglevel=error)
  fi
  (cd web && npm run --silent vendor)
}

# The Helm chart's test (tests/unit/test_helm_chart.py) runs `helm lint` and `helm template`.
# helm is built with `go install` from the Go module proxy (no downloaded release binary), into a
# git-ignored project directory; a second run only checks the version.
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
HELM_BIN="${HELM_BIN:-.tools/bin}"
helm_cli() {
  command -v go >/dev/null || { echo "bootstrap: helm needs Go (https://go.dev/dl/)" >&2; exit 1; }
  # The module version the binary was built from (`helm version` says only v3.22 without ldflags).
  if [ -x "$HELM_BIN/helm" ] \
    && [ "$(go version -m "$HELM_BIN/helm" | awk '$1 == "mod" {print $3}')" = "$HELM_VERSION" ]; then
    return 0
  fi
  echo "bootstrap: building helm $HELM_VERSION into $HELM_BIN (go install, a few minutes once)"
  mkdir -p "$HELM_BIN"
  GOBIN="$(pwd)/$HELM_BIN" GOFLAGS=-buildvcs=false \
    go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

case "${1:-all}" in
  system) system_packages ;;
  python) python_env ;;
  web) web_assets ;;
  helm) helm_cli ;;
  all) system_packages; python_env; web_assets; helm_cli ;;
  *) echo "usage: $0 [system|python|web|helm|all]" >&2; exit 2 ;;
esac
