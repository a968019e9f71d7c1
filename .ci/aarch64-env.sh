#!/usr/bin/env bash
# Builds an emulated aarch64 Python 3.11 with torch 2.14.1 + executorch 1.5.1 under DIR, for running the
# edge's code as it would run on a 64-bit ARM board (qemu user-mode emulation of a Cortex-A72, the Pi 4's core).
# Usage: .ci/aarch64-env.sh [DIR]   (default /var/cache/hiertrain/aarch64)   then: DIR/python script.py
# HT_QEMU_CPU picks the emulated core at run time (default cortex-a72, the Pi 4; cortex-a76 is Pi 5 / Jetson class).
# Needs root (apt-get) and the package index; downloads ~3 GB once; re-running reuses what is there.
set -euo pipefail
DIR=$(mkdir -p "${1:-/var/cache/hiertrain/aarch64}" && cd "${1:-/var/cache/hiertrain/aarch64}" && pwd); shift || true
ROOT=$DIR/sysroot CUDA=$DIR/cuda WHL=$DIR/wheels
command -v qemu-aarch64-static >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static gcc-aarch64-linux-gnu >/dev/null; }
command -v aarch64-linux-gnu-gcc >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu >/dev/null
# 1. Debian's arm64 Python, unpacked into a private sysroot. Never `apt-get install python3:arm64`:
#    multiarch would replace this machine's own python3.11.
if [ ! -x "$ROOT/usr/bin/python3.11" ]; then
  grep -q arm64 <(dpkg --print-foreign-architectures) || { dpkg --add-architecture arm64; apt-get update -qq; }
  mkdir -p "$DIR/debs" && cd "$DIR/debs"
  apt-get download python3.11-minimal:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 \
    libc6:arm64 libgcc-s1:arm64 libstdc++6:arm64 zlib1g:arm64 libexpat1:arm64 libffi8:arm64 libssl3:arm64 \
    libbz2-1.0:arm64 liblzma5:arm64 libsqlite3-0:arm64 libuuid1:arm64 libncursesw6:arm64 libtinfo6:arm64 \
    libreadline8:arm64 libcrypt1:arm64 libgomp1:arm64 libnsl2:arm64 libtirpc3:arm64 libgssapi-krb5-2:arm64 \
    libkrb5-3:arm64 libk5crypto3:arm64 libkrb5support0:arm64 libcom-err2:arm64 libkeyutils1:arm64 libdb5.3:arm64 >/dev/null
  for f in *.deb; do dpkg -x "$f" "$ROOT"; done
  cd - >/dev/null
fi
# 2. What qemu-user cannot give: the board's /proc/cpuinfo (qemu passes the x86 host's, and PyTorch's cpuinfo
#    then crashes while torch loads) and MIDR_EL1. qemu looks up absolute paths under the sysroot first.
mkdir -p "$ROOT/proc"
N=$(nproc)
python3 - "$ROOT/proc/cpuinfo" "$N" <<'PY'
import sys
out, n = sys.argv[1], int(sys.argv[2])
core = ["BogoMIPS\t: 108.00", "Features\t: fp asimd evtstrm crc32 cpuid", "CPU implementer\t: 0x41",
        "CPU architecture: 8", "CPU variant\t: 0x0", "CPU part\t: 0xd08", "CPU revision\t: 3", ""]
text = "".join(f"processor\t: {i}\n" + "\n".join(core) + "\n" for i in range(n))
open(out, "w").write(text + "Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B\n")
PY
for i in $(seq 0 $((N - 1))); do
  d=$ROOT/sys/devices/system/cpu/cpu$i/regs/identification; mkdir -p "$d"; echo 0x00000000410fd083 > "$d/midr_el1"
done
# 3. aarch64 wheels. The index's aarch64 torch is a CUDA build: it will not import without the CUDA 13
#    libraries, so they are unpacked beside it (no GPU is used). One (CUPTI 13) has no aarch64 wheel on the
#    index: a stub with the symbols libtorch_cpu links (only the profiler ever calls them) stands in.
P="--platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_18_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 --platform any --python-version 3.11 --implementation cp --only-binary=:all:"
#    The packages are the board's install list, toolkit/deploy/board-requirements.txt (--no-deps, as docs/deploy.md
#    says): one site directory per version of the list, so the tests run what the docs tell a user.
REQ=$(cd "$(dirname "$0")/.." && pwd)/toolkit/deploy/board-requirements.txt
SITE=$DIR/site-$(sha256sum "$REQ" | cut -c1-12)
mkdir -p "$WHL"
if [ ! -d "$SITE/torch" ]; then
  rm -rf "$WHL/board" && mkdir -p "$WHL/board"
  pip download -q --no-deps -d "$WHL/board" --find-links "$WHL" $P -r "$REQ" "$@"
  rm -rf "$SITE.tmp" && mkdir -p "$SITE.tmp"; for w in "$WHL"/board/*.whl; do unzip -o -q "$w" -d "$SITE.tmp"; done
  mv "$SITE.tmp" "$SITE"
  for old in "$DIR"/site-*; do [ "$old" = "$SITE" ] || rm -rf "$old"; done   # earlier lists
fi
if [ ! -d "$CUDA/nvidia/cu13" ]; then
  pip download -q --no-deps -d "$WHL/cuda" $P nvidia-cublas nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft \
    nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-nvjitlink nvidia-cuda-nvrtc nvidia-nvtx nvidia-cufile \
    nvidia-cusparselt-cu13 nvidia-nccl-cu13 nvidia-nvshmem-cu13
  mkdir -p "$CUDA"; for w in "$WHL"/cuda/*.whl; do unzip -o -q "$w" -d "$CUDA"; done
fi
if [ ! -f "$CUDA/nvidia/cu13/lib/libcupti.so.13" ]; then
  syms=$(readelf --dyn-syms -W "$SITE/torch/lib/libtorch_cpu.so" | awk '$8 ~ /@libcupti.so.13/ {sub(/@.*/, "", $8); print $8}' | sort -u)
  { for s in $syms; do echo "int $s(void){return 15;}"; done; } > "$DIR/cupti_stub.c"
  echo 'libcupti.so.13 { global: *; };' > "$DIR/cupti.map"
  aarch64-linux-gnu-gcc -shared -fPIC -O2 -Wl,-soname,libcupti.so.13 -Wl,--version-script="$DIR/cupti.map" \
    -o "$CUDA/nvidia/cu13/lib/libcupti.so.13" "$DIR/cupti_stub.c"
fi
# 4. The launcher.
L=$CUDA/nvidia/cu13/lib:$CUDA/nvidia/cudnn/lib:$CUDA/nvidia/nccl/lib:$CUDA/nvidia/nvshmem/lib
cat > "$DIR/python" <<SH
#!/bin/sh
# aarch64 Python 3.11 under qemu (Cortex-A72); extra paths for the project's own code go in PYTHONPATH.
QEMU_LD_PREFIX="$ROOT" LD_LIBRARY_PATH="$L" PYTHONPATH="\${PYTHONPATH:+\$PYTHONPATH:}$SITE:$CUDA" \
  exec qemu-aarch64-static -cpu "\${HT_QEMU_CPU:-cortex-a72}" "$ROOT/usr/bin/python3.11" "\$@"
SH
chmod +x "$DIR/python"
"$DIR/python" -c "import platform, torch, executorch; print(platform.machine(), 'torch', torch.__version__, 'ok')"
