"""What is measured of a cell, and the statistics on it.

``measure`` (top-1 with intervals, interleaved throughput and latency, peak memory, attention
kernels), ``flops`` (fvcore's count, SDPA included, as GMACs), ``tokenmap`` (which patches survive),
``fidelity`` (the golden-logit rule against the authors' code) and ``stats`` (Wilson and Newcombe
intervals, McNemar, Holm and Benjamini-Hochberg).
"""
