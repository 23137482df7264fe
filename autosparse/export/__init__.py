"""Stage 8, export: from a trial of the study to files a runtime loads, at the scored size.

Owns ``autosparse export`` (``exporter``, with the request and trial pick in ``request``, the
format checks in ``checks``, latency predictions in ``latency`` and report.md in ``report``): the
rebuild, ONNX and int8 files, the packed file (``packed``, ``bitpack``: exactly the bits the size
formula counts), the input spec a deployment feeds (``input_spec``) and the export folder as a
unit (``folder``).
May import every earlier stage: ``config`` to ``search``.
"""
