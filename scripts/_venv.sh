# shellcheck shell=bash
# Sourced by scripts/demo and scripts/test (from the repository root): `ensure_venv SPEC`
# makes .venv (once) and installs this checkout editable with SPEC (`.` or `.[test]`).
# The install is skipped when a stamp in .venv says it was already done for the same
# pyproject.toml, checkout path and SPEC: a warm start costs no pip run (~2 s).

ensure_venv() {
    spec=$1
    py=${PYTHON:-python3}
    if [ ! -x .venv/bin/python ]; then
        if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
            echo "trainenv needs Python >= 3.9, and '$py' is not one: set PYTHON=/path/to/python3" >&2
            exit 1
        fi
        if ! "$py" -m venv .venv; then
            echo "could not create .venv with $py (on Debian/Ubuntu: apt-get install python3-venv)" >&2
            rm -rf .venv
            exit 1
        fi
        # Editable installs from pyproject.toml alone need pip >= 21.3.
        .venv/bin/python -m pip install -q --disable-pip-version-check 'pip>=21.3'
    fi
    stamp=".venv/.trainenv-install-$(printf '%s' "$spec" | tr -c 'A-Za-z0-9' '_')"
    key="$(cksum <pyproject.toml) $(pwd -P) $spec"
    if [ -x .venv/bin/trainenv ] && [ "$(cat "$stamp" 2>/dev/null)" = "$key" ]; then
        return 0
    fi
    .venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"
    printf '%s\n' "$key" >"$stamp"
}
