#!/usr/bin/env bash
# Installs what the build and the local environment need and the machine lacks:
# Debian packages (only when missing), the Rust components, and the Python tools
# (in a virtualenv under the cache). Safe to run repeatedly.
. "$(dirname "$0")/lib.sh"

PKGS=(libclang-dev libcurl4-openssl-dev libsasl2-dev libssl-dev cmake openssl curl pkg-config shellcheck procps)
ensure_packages "${PKGS[@]}"
for tool in go java mvn cargo python3; do
  command -v "$tool" >/dev/null || die "$tool is required (see README: prerequisites)"
done
if command -v rustup >/dev/null; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi

# ONNX Runtime's shared library (model.runtime: onnxruntime).
onnxruntime_lib >/dev/null

# Python tools (test-model generation): a virtualenv keyed by the requirements file.
req="$ROOT/models/requirements.txt"
if [[ -f $req ]]; then
  venv=$(python_venv "" "$req")
  ln -sfn "$venv" "$CACHE/venv"
fi
