"""lkconv's benchmark suite: per-pass op latency, the RepLKNet paper's Table 1 and RepLKNet-31B throughput, each
against PyTorch (native NCHW kernels, cuDNN channels_last, torch.compile) measured in the same run.

Run it with ``python -m benchmarks`` (or ``lkconv-bench`` once installed); ``--help`` lists the options.
"""
