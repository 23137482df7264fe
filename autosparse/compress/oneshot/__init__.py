"""One-shot compression of a layer's weight, for models too large to fine-tune per candidate.

Every compressor here works on one ``nn.Linear`` weight ``W`` of shape ``[out, in]`` and the
statistics of that layer's dense inputs on a few calibration sequences (``calibration``). Bits go
through a quantization ``Grid`` (``grid``): a grid says which values a block of weights may take
(and how they are stored), so round-to-nearest and GPTQ give the same stored format and the export
writes exactly what was scored. Sparsity: magnitude, Wanda and SparseGPT, unstructured or N:M.
Part of stage 4 (compress); imports torch, numpy and gguf (for the GGUF block layouts) only.
"""
