"""Datasets both runtimes read: digits, CIFAR-10 copies, .npz and image folders, personal shifts."""
