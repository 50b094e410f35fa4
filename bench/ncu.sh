#!/usr/bin/env bash
# Nsight Compute on a script's kernels, on the GPU machine: per kernel its duration, DRAM / L2 / L1 / SM throughput
# (% of peak), the bytes it read from DRAM and moved from L2 to the SMs, cycles per issued instruction and
# achieved occupancy. Use it to see what bounds a kernel (bench/RESULTS.md, twenty-fourth session: the FP8 GEMMs
# at the prefill's sizes are bound neither by DRAM nor by L2).
#
#     PYTHONPATH=. bash bench/ncu.sh SCRIPT.py [LAUNCHES] [NAME_REGEX]
#
# SCRIPT.py should make its inputs on the host (jax.device_put of numpy arrays), so that the kernels it launches are
# the ones to measure, and call each jitted function a couple of times. LAUNCHES (default 60) caps how many kernel
# launches are profiled; NAME_REGEX (default: every kernel) filters the printed kernels by name. No `-k` filter is
# passed to ncu: the Mosaic GPU kernels are named `body_mosaic_gpu_kernel` and a filtered run has missed them.
# Command buffers are turned off so that each kernel is launched on its own (clocks are left as the card sets them).
set -euo pipefail
script=${1:?usage: bash bench/ncu.sh SCRIPT.py [LAUNCHES] [NAME_REGEX]}
launches=${2:-60}
pattern=${3:-.}
ncu=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
log=$(mktemp)
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5} \
  "$ncu" --clock-control none --target-processes all --launch-count "$launches" \
  --section SpeedOfLight --section Occupancy --section WarpStateStats \
  --metrics dram__bytes_read.sum,l1tex__m_xbar2l1tex_read_bytes.sum \
  python "$script" > "$log" 2>&1 || { tail -20 "$log"; exit 1; }
grep -v -i "warn" "$log" \
  | grep -E -e "CC [0-9.]+$|Duration|DRAM Throughput|L2 Cache Throughput|L1/TEX Cache Throughput" \
            -e "Compute \(SM\) Throughput|Achieved Occupancy|Warp Cycles Per Issued|dram__bytes_read|xbar2l1tex" \
  | awk -v pat="$pattern" '/CC [0-9.]+$/ {keep = ($0 ~ pat)} keep'
rm -f "$log"
