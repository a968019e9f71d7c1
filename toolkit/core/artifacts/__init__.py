"""Files that cross from build time to run time: manifest, board profiles, checkpoints."""
