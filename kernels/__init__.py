"""CUDA C sources of fastnet's fused kernels (installed as ``fastnet._cuda``; loaded by fastnet.kernels)."""
