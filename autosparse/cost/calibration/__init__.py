"""Calibration measurements: real model variants timed with ONNX Runtime on the local CPU.

The cost model's free constants are fitted to (and validated on held-out) measurements of
narrower, int8, mixed-precision and zeroed-weight variants built here.
"""
