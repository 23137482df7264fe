#!/usr/bin/env bash
# llama.cpp's Python binding (llama-cpp-python) in .venv, for the GGUF export test
# (tests/export/test_gguf_export.py, tests/search/test_oneshot_search.py): the exported file must load and compute in the real runtime.
#
# Present (`import llama_cpp` works): nothing to do, nothing printed. Missing: .venv is set up
# first when there is none (scripts/setup.sh), then `pip install llama-cpp-python`, which builds
# llama.cpp from source (CPU only; about 20 minutes on 2 cores). The build needs cmake and a C++
# compiler: missing ones are installed with apt-get when root.
# The build is portable by default (CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF": AVX2/FMA/
# F16C, no -march=native, no multimodal library): a native build on a CPU that advertises AMX in a
# VM or sandbox that does not enable it dies with SIGILL on the first quantized matmul, which
# takes the whole test run down. $AUTOSPARSE_LLAMA_CPP_CMAKE_ARGS replaces those arguments.
# The wheel is built once per set of flags and kept in ~/.cache/autosparse/wheels/<flags hash>
# ($AUTOSPARSE_WHEEL_CACHE), so a fresh clone or venv installs it in seconds afterwards; pip's own
# wheel cache is bypassed so the flags always apply.
# Failure: one line with the reason on stderr (the pip log's tail first), exit 3; the test is
# then skipped with its own reason.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "scripts/llama_cpp.sh: $*" >&2; exit 3; }

if [ ! -x .venv/bin/python ]; then
  bash scripts/setup.sh >/dev/null || die "scripts/setup.sh failed, no .venv to install into"
fi
if .venv/bin/python -c "import llama_cpp" >/dev/null 2>&1; then
  exit 0
fi

log=$(mktemp /tmp/autosparse-llama-cpp-XXXXXX.log)
trap 'rm -f "$log"' EXIT
if ! command -v cmake >/dev/null || ! command -v c++ >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
             --no-install-recommends cmake build-essential; } >"$log" 2>&1; then
      tail -n 20 "$log" >&2
      die "installing cmake and a C++ compiler with apt-get failed"
    fi
  else
    die "building llama-cpp-python needs cmake and a C++ compiler; install them (Debian: apt-get install cmake build-essential) or run as root"
  fi
fi

export CMAKE_ARGS="${AUTOSPARSE_LLAMA_CPP_CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}"
flags=$(printf '%s %s' "$CMAKE_ARGS" "$(uname -m)" | sha256sum | cut -c1-12)
wheels="${AUTOSPARSE_WHEEL_CACHE:-$HOME/.cache/autosparse/wheels}/llama-cpp-$flags"
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  mkdir -p "$wheels"
  if ! .venv/bin/python -m pip wheel --quiet --no-deps --no-cache-dir -w "$wheels.tmp" \
         llama-cpp-python >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    rm -rf "$wheels.tmp"
    die "building the llama-cpp-python wheel failed (llama.cpp from source)"
  fi
  mv "$wheels.tmp"/llama_cpp_python-*.whl "$wheels"/ && rm -rf "$wheels.tmp"
fi
if ! .venv/bin/python -m pip install --quiet "$wheels"/llama_cpp_python-*.whl >"$log" 2>&1; then
  tail -n 20 "$log" >&2
  die "pip install of the llama-cpp-python wheel in $wheels failed"
fi
.venv/bin/python -c "import llama_cpp" >/dev/null 2>&1 \
  || die "llama-cpp-python installed, but 'import llama_cpp' fails"
