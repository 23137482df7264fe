"""Stage 5, cost: what a candidate costs on a target device, predicted or measured.

Owns the analytic cost model (``estimate``: latency, energy, no forward pass), the per-layer
cost report (``report``), the measured latency table of a user's model (``latency_table``),
direct measurement of a candidate's deployed file (``measured_latency``), the ONNX files a
deployment runs and their timing (``onnx_files``), and ``autosparse calibrate`` with its
measurements and fits (``calibrate``, ``calibration/``).
May import: ``config``, ``workload``, ``space``, ``compress``.
"""
