"""hiertrain toolkit: build-time half of hierarchical edge-cloud training.

Holds the models and split points, exit heads, the ExecuTorch exporter, board
profiles, and the wire protocol and codecs that edge_runtime and cloud_trainer
share (they share nothing else).
"""

__version__ = "0.1.0"
