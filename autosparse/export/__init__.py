"""Exporting compressed models: compact checkpoints that store exactly what the size formula counts."""
