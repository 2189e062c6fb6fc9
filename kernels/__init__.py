"""Triton kernels and their launchers (installed as ``llmkern.kernels``). No autograd here."""
