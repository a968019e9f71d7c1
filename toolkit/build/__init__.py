"""Build side: the ExecuTorch export of the edge training program, lowering, parity checks."""
