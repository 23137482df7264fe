"""The graph that travels inside a packed file, so ``load_packed(path)`` needs no model code.

Why a weight-free program: the packed payload is the scored size to the byte, and a
``torch.export`` program of the model would carry every weight again at float32. So the model
is exported as a *function of its state*::

    program(state: {state-dict key: tensor}, *inputs) = functional_call(model, state, inputs)

Nothing of the model's tensors is captured (``torch.export`` lifts no parameter: the model is
not a submodule of the traced wrapper, and every tensor it reads comes from ``state``). The
serialized program (``torch.export.save``) is zlib-compressed into the file's graph section,
whose bytes are shown apart from the payload. Loading decodes the payload's tensors by key,
loads the program and wraps both in :class:`PackedProgram`, an ``nn.Module`` whose
``forward(*inputs)`` is the exported model's. The batch dimension of the first input is dynamic.

The graph needs the torch version that wrote it or a compatible one (``torch.export``'s
serialization); the header records the version.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["GRAPH_FORMAT", "PackedProgram", "graph_bytes", "load_graph"]

GRAPH_FORMAT = "torch.export-functional+zlib"


class _Functional(nn.Module):
    """``forward(state, *inputs)`` = the model with ``state`` swapped in (module doc)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule: export lifts nothing

    def forward(self, state: dict[str, Tensor], *inputs: Tensor):
        # not strict: non-persistent buffers (a causal mask) are not in the state dict and
        # become the program's constants; every parameter is in ``state`` (graph_bytes checks)
        return torch.func.functional_call(self._model, state, inputs, strict=False)


def graph_bytes(model: nn.Module, example: tuple[Tensor, ...]) -> bytes:
    """The compressed weight-free program of ``model`` (eval mode) for inputs like ``example``
    (batch dimension dynamic; take a batch of 2: ``torch.export`` specialises size-1 dims)."""
    state = {key: value.detach() for key, value in model.state_dict(keep_vars=False).items()}
    batch = torch.export.Dim("batch")
    dynamic = ({key: None for key in state}, tuple({0: batch} for _ in example))  # *inputs
    was_training = model.training
    model.eval()
    try:
        program = torch.export.export(_Functional(model), (state, *example),
                                      dynamic_shapes=dynamic)
    finally:
        model.train(was_training)
    constant_bytes = sum(t.numel() * t.element_size() for t in program.constants.values()
                         if isinstance(t, Tensor))
    derived = sum(b.numel() * b.element_size() for key, b in model.named_buffers()
                  if key not in state)  # non-persistent buffers: the only tensors allowed in
    if constant_bytes > derived:
        raise ValueError(f"the exported graph captured {constant_bytes} bytes of tensors beyond "
                         f"the model's non-persistent buffers ({derived}): weights would be "
                         "stored twice")
    # the example inputs would be saved too - the whole state among them: the weights again
    program._example_inputs = None
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return zlib.compress(buffer.getvalue(), 9)


def load_graph(blob: bytes) -> nn.Module:
    """The callable program (``program(state, *inputs)``) of a graph section."""
    return torch.export.load(io.BytesIO(zlib.decompress(blob))).module()


class PackedProgram(nn.Module):
    """A packed model loaded without its code: the file's tensors (as buffers, by their
    state-dict keys) and its exported graph. ``model(x)`` computes what the exported model did;
    ``tensors()`` gives the decoded weights by the original keys (pruned ones as zeros,
    quantized ones as ``code * scale``)."""

    def __init__(self, program: nn.Module, state: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.program = program
        self._keys = list(state)
        for index, key in enumerate(self._keys):
            self.register_buffer(f"t{index}", state[key])

    def tensors(self) -> dict[str, Tensor]:
        """The decoded tensors by the original model's state-dict keys."""
        return {key: getattr(self, f"t{index}") for index, key in enumerate(self._keys)}

    def forward(self, *inputs: Tensor):
        return self.program(self.tensors(), *inputs)

    def train(self, mode: bool = True) -> "PackedProgram":
        """The program was exported in eval mode and has no other: ``eval()`` is a no-op and
        training mode cannot be switched on (``torch.export`` programs do not support it)."""
        if mode:
            raise NotImplementedError("a packed program runs in eval mode only (it was "
                                      "exported for inference); load it with skeleton= to train")
        self.training = False
        return self
