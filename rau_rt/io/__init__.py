"""Inputs and outputs: frame sources, result sinks and reference annotations.

`io` sits on the core layer and on `synthetic` (whose cines are a source like any file); the
pipeline takes sources and sinks as objects and `rau_rt.cli` wires them.
"""
