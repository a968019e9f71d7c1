"""What a published cut reveals: the reconstruction attacker (build side, never on a board)."""
