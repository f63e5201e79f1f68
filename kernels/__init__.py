"""Triton kernels and their launchers, installed as ``fastswav.kernels``.

No autograd and no backend policy here: ``fastswav.ops`` wraps these.
"""
