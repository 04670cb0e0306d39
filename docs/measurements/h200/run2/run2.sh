#!/bin/bash
# Device run 2: host-resident steps (WGSL build) and CubeCL's SPIR-V compiler with its disk
# cache (spirv build), whole models; Flex resident steps on 2 and 16 cores.
set -u
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
export XDG_RUNTIME_DIR=/tmp
[ -e /work/main ] || { mkdir -p /work; ln -s "$PWD" /work/main; }
gunzip -c .devbin/bench-wgsl.gz > /tmp/bw; gunzip -c .devbin/bench-spirv.gz > /tmp/bs; chmod +x /tmp/bw /tmp/bs
L=/tmp/log; mkdir -p $L
t0=$(date +%s)
stamp() { echo "== $1 at $(( $(date +%s) - t0 )) s" | tee -a $L/00-card.txt; tar czf $OUT/run2.tgz -C /tmp log; }
nvidia-smi -L > $L/00-card.txt 2>&1
LOGS=adaround=debug,cubecl_common=info,cubecl_runtime=info,cubecl=info
mkdir -p /tmp/w /tmp/s /tmp/x
printf '[compilation.logger]\nlevel = "basic"\nlog = "info"\n' > /tmp/w/cubecl.toml
printf '[compilation]\ncache = "local"\n[compilation.logger]\nlevel = "basic"\nlog = "info"\n' > /tmp/s/cubecl.toml
cp /tmp/s/cubecl.toml /tmp/x/
(cd /tmp/w && RUST_LOG=$LOGS timeout 60 /tmp/bw --quickstart --backend wgpu > $L/01-qs-wgsl-resident.txt 2>&1)
stamp qs-wgsl
(cd /tmp/x && RUST_LOG=$LOGS timeout 80 /tmp/bs --xception --backend wgpu > $L/04-xc-spirv-1.txt 2>&1)
stamp xc-spirv-1
(cd /tmp/s && RUST_LOG=$LOGS timeout 60 /tmp/bs --quickstart --backend wgpu > $L/02-qs-spirv-1.txt 2>&1)
stamp qs-spirv-1
(cd /tmp/s && RUST_LOG=$LOGS timeout 40 /tmp/bs --quickstart --backend wgpu > $L/03-qs-spirv-2.txt 2>&1)
stamp qs-spirv-2
(cd /tmp/x && RUST_LOG=$LOGS timeout 60 /tmp/bs --xception --backend wgpu > $L/05-xc-spirv-2.txt 2>&1)
stamp xc-spirv-2
RAYON_NUM_THREADS=2 taskset -c 0,1 timeout 50 /tmp/bw --backend flex --elementwise resident > $L/06-flex-resident-2core.txt 2>&1
stamp flex2
timeout 40 /tmp/bw --backend flex --elementwise resident > $L/07-flex-resident-16core.txt 2>&1
stamp flex16
timeout 30 /tmp/bw --xception --backend flex > $L/08-xc-flex16.txt 2>&1
stamp xc-flex
