#!/bin/bash
# Device run 1: step side-by-side (acceptance), whole-model phases on Wgpu, Flex 2 vs 16 cores.
set -u
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
export XDG_RUNTIME_DIR=/tmp
[ -e /work/main ] || { mkdir -p /work; ln -s "$PWD" /work/main; }
gunzip -c .devbin/bench.gz > /tmp/bench; chmod +x /tmp/bench
B=/tmp/bench
L=/tmp/log; mkdir -p $L
t0=$(date +%s)
stamp() { echo "== $1 at $(( $(date +%s) - t0 )) s" | tee -a $L/00-card.txt; tar czf $OUT/run1.tgz -C /tmp log; }
{ nvidia-smi -L; nproc; python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))'; } > $L/00-card.txt 2>&1
if ! ldconfig -p | grep -q libvulkan.so.1; then echo "no vulkan loader" >> $L/00-card.txt; fi
stamp start
mkdir -p /tmp/xc && cat > /tmp/xc/cubecl.toml <<'T'
[compilation.logger]
level = "basic"
log = "info"
[autotune.logger]
level = "minimal"
log = "info"
T
LOGS=adaround=debug,cubecl_common=info,cubecl_runtime=info,cubecl=info
# 1. whole quickstart model, 3 runs (cold, warm, warm), phases at debug level
(cd /tmp/xc && RUST_LOG=$LOGS timeout 90 $B --quickstart --backend wgpu > $L/01-quickstart-wgpu.txt 2>&1)
stamp qs-wgpu-default
(cd /tmp/xc && CUBECL_AUTOTUNE_LEVEL=minimal RUST_LOG=$LOGS timeout 90 $B --quickstart --backend wgpu > $L/01b-quickstart-wgpu-minimal.txt 2>&1)
stamp qs-wgpu
timeout 60 $B --quickstart --backend wgpu-plain > $L/02-quickstart-wgpuplain.txt 2>&1
timeout 60 $B --quickstart --backend flex > $L/03-quickstart-flex16.txt 2>&1
RAYON_NUM_THREADS=2 taskset -c 0,1 timeout 60 $B --quickstart --backend flex > $L/04-quickstart-flex2.txt 2>&1
stamp qs-rest
# 3. the steps against PyTorch CUDA (the acceptance table), fusion and plain
timeout 200 bash crates/adaround-examples/benches/side_by_side.sh --gpu --bin $B > $L/07-gpu-side-by-side.txt 2>&1
stamp side
# 2. mini-XCEPTION size, Wgpu fusion with phases and CubeCL's compile/autotune log; Flex
(cd /tmp/xc && RUST_LOG=$LOGS timeout 150 $B --xception --backend wgpu > $L/05-xception-wgpu.txt 2>&1)
stamp xc-wgpu
timeout 60 $B --xception --backend flex > $L/06-xception-flex16.txt 2>&1
stamp xc-flex
# 4. Flex steps on 2 and 16 cores
RAYON_NUM_THREADS=2 taskset -c 0,1 timeout 100 $B --backend flex > $L/08-flex-2core.txt 2>&1
stamp flex2
timeout 100 $B --backend flex > $L/09-flex-16core.txt 2>&1
stamp flex16
(cd /tmp/xc && CUBECL_AUTOTUNE_LEVEL=minimal RUST_LOG=$LOGS timeout 100 $B --xception --backend wgpu > $L/10-xception-wgpu-minimal.txt 2>&1)
stamp xc-minimal
cp -r out/bench $L/bench 2>/dev/null
tar czf $OUT/run1.tgz -C /tmp log
