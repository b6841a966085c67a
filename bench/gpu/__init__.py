"""GPU benchmark (bench/gpu_bench.sh): prepared here, run on a machine with an NVIDIA GPU."""
