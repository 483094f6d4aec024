"""Inference backends (installed as `rau_rt.engines`): one `Engine` subclass per file.

Each backend imports its runtime library (onnxruntime, tensorrt, torch, tritonclient) inside its
`load`, so this package imports on a host that has none of them.
"""
