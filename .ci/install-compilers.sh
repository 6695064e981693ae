#!/usr/bin/env bash
# Installs the two run-time kernel compilers gptc uses, on Debian 12 (bookworm), for
# compiling without a GPU (and running, where a GPU and its driver are present):
#
#   AMD:    hiprtc from Debian's ROCm 5.2 packages (libamdhip64-5, which exports the
#           hiprtc API, its device built-ins libhiprtc-builtins5, and libamd-comgr2),
#           plus hip-python, the Python binding.
#   NVIDIA: NVRTC from the nvidia-cuda-nvrtc wheel, plus cuda-bindings (cuda-python).
#
# hip-python loads $ROCM_PATH/lib/libhiprtc.so (ROCM_PATH defaults to /opt/rocm), but
# Debian ships hiprtc inside libamdhip64.so.5 and no libhiprtc.so. This script makes a
# bridge directory, $GPTC_ROCM_BRIDGE (default ~/.cache/gptc/rocm-bridge), holding
#   lib/libhiprtc.so   -> the library that exports hiprtcCreateProgram
#   lib/libamdhip64.so -> libamdhip64.so.5
# gptc/runtime/hip.py points ROCM_PATH at that directory by itself when ROCM_PATH is
# unset (and /opt/rocm holds no hiprtc), so nothing needs exporting; other programs
# using hip-python can `export ROCM_PATH=<bridge>` (printed at the end).
#
# hip-python version: PyPI has no release for ROCm 5.x (the oldest, 6.2.0, dlopens a
# bare "libhiprtc.so" and ignores ROCM_PATH). hip-python 10.0.0.0.1.2 resolves libraries
# under $ROCM_PATH/lib, loads symbols lazily, is 19 MB instead of 300 MB for 6.3-7.2, and
# its hiprtc calls (create/compile/log/code/destroy, version) work against ROCm 5.2,
# tested here for gfx90a, gfx908, gfx906 and gfx1030. Its HIP *device* calls target
# ROCm >= 6 (hipGetDeviceProperties is the R0600 symbol): on a host with a real AMD GPU,
# install the hip-python matching that host's ROCm instead (HIP_PYTHON_SPEC=...).
#
# Idempotent: installed packages and an up-to-date bridge are left alone.
# Environment: PYTHON (default python3), GPTC_ROCM_BRIDGE, HIP_PYTHON_SPEC,
#              CUDA_BINDINGS_SPEC, NVRTC_SPEC, GPTC_SKIP_APT=1 (no apt-get).
set -euo pipefail

PYTHON=${PYTHON:-python3}
BRIDGE=${GPTC_ROCM_BRIDGE:-${HOME}/.cache/gptc/rocm-bridge}
HIP_PYTHON_SPEC=${HIP_PYTHON_SPEC:-hip-python==10.0.0.0.1.2}
CUDA_BINDINGS_SPEC=${CUDA_BINDINGS_SPEC:-cuda-bindings==13.5.0}
NVRTC_SPEC=${NVRTC_SPEC:-nvidia-cuda-nvrtc==13.5.37}
APT_PACKAGES=(libamdhip64-5 libhiprtc-builtins5 libamd-comgr2)

log() { echo "install-compilers: $*" >&2; }

# --- 1. Debian's ROCm 5.2 runtime compiler --------------------------------------------
if [[ "${GPTC_SKIP_APT:-0}" != 1 ]]; then
    missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        SUDO=()
        [[ $(id -u) == 0 ]] || SUDO=(sudo)
        log "apt-get install ${missing[*]}"
        "${SUDO[@]}" apt-get update -qq
        DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

# --- 2. the bridge directory -----------------------------------------------------------
# Prefer a real libhiprtc.so.* (newer ROCm packaging), else libamdhip64.so.5; keep the
# first one that really exports hiprtcCreateProgram.
LDCONFIG=$(command -v ldconfig || echo /sbin/ldconfig)
candidates=$("$LDCONFIG" -p | awk '/(libhiprtc\.so\.[0-9]|libamdhip64\.so\.[0-9])/ {print $NF}' | sort -r)
hiprtc_lib=$("$PYTHON" - $candidates <<'EOF'
import ctypes, sys
for path in sys.argv[1:]:
    try:
        lib = ctypes.CDLL(path)
        lib.hiprtcCreateProgram  # raises AttributeError if not exported
    except (OSError, AttributeError):
        continue
    print(path)
    break
EOF
)
amdhip_lib=$("$LDCONFIG" -p | awk '/libamdhip64\.so\.[0-9]/ && !found {print $NF; found = 1}')
if [[ -z "$hiprtc_lib" || -z "$amdhip_lib" ]]; then
    log "no library exporting the hiprtc API was found (looked at: ${candidates:-nothing})"
    exit 1
fi
mkdir -p "$BRIDGE/lib"
ln -sfn "$hiprtc_lib" "$BRIDGE/lib/libhiprtc.so"
ln -sfn "$amdhip_lib" "$BRIDGE/lib/libamdhip64.so"
log "bridge $BRIDGE/lib/libhiprtc.so -> $hiprtc_lib"

# --- 3. Python bindings and NVRTC ---------------------------------------------------------
have_specs() {  # are these exact NAME==VERSION specs installed already?
    "$PYTHON" - "$@" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        sys.exit(1)
    if want and have != want:
        sys.exit(1)
EOF
}
if ! have_specs "$HIP_PYTHON_SPEC" "$CUDA_BINDINGS_SPEC" "$NVRTC_SPEC"; then
    log "pip install $HIP_PYTHON_SPEC $CUDA_BINDINGS_SPEC $NVRTC_SPEC"
    "$PYTHON" -m pip install -q --disable-pip-version-check --root-user-action=ignore \
        "$HIP_PYTHON_SPEC" "$CUDA_BINDINGS_SPEC" "$NVRTC_SPEC"
fi

# --- 4. smoke test: one tiny kernel through each compiler -------------------------------
ROCM_PATH=${ROCM_PATH:-$BRIDGE} "$PYTHON" - <<'EOF'
from hip import hiprtc
from cuda.bindings import nvrtc
src = b'extern "C" __global__ void k(float* x) { x[threadIdx.x] *= 2.0f; }'
err, prog = hiprtc.hiprtcCreateProgram(src, b"k.hip", 0, [], [])
assert err == hiprtc.hiprtcResult.HIPRTC_SUCCESS, err
err, = hiprtc.hiprtcCompileProgram(prog, 1, [b"--offload-arch=gfx90a"])
assert err == hiprtc.hiprtcResult.HIPRTC_SUCCESS, f"hiprtc: {err}"
hiprtc.hiprtcDestroyProgram(prog.createRef())
err, prog = nvrtc.nvrtcCreateProgram(src, b"k.cu", 0, [], [])
err, = nvrtc.nvrtcCompileProgram(prog, 1, [b"-arch=sm_90"])
assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, f"nvrtc: {err}"
nvrtc.nvrtcDestroyProgram(prog)
print("install-compilers: hiprtc (gfx90a) and NVRTC (sm_90) compile", flush=True)
EOF
log "done. gptc finds the bridge by itself; for other hip-python users: export ROCM_PATH=$BRIDGE"
echo "ROCM_PATH=$BRIDGE"
