"""Stage 4, compress: a candidate applied to a copy of the dense model, and what it stores.

Owns masks x fake-quant parametrizations and baking (``apply``), physical removal of pruned
channel groups (``shrink``), the fast distilled fine-tune (``finetune``), and the stored-size
formula (``footprint``: values, indices, scales) with what a compressed model really holds
(``storage``). One-shot compressors (GPTQ, SparseGPT, Wanda) belong here too.
May import: ``config``, ``workload``, ``space``.
"""
