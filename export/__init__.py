"""Export pipeline (installed as `rau_rt.export`): PyTorch models -> verified graph bundles.

Installed with the runtime because TensorRT engines are built on the target box. Imported only by
`rau_rt.cli`; torch, onnx and transformers are imported by the stage modules, never here.
"""
