"""fsc.kernels: Triton kernels with their launchers, registration and PyTorch references.

- :func:`jagged_attention`: jagged generalized dot-product attention (HSTU's SiLU attention
  and softmax attention; causal, target, contextual-prefix and window masks; in-kernel
  relative position and time bias; separate key/value extents, ``kv_offsets`` and
  ``q_start``, for a chunk of a split sequence), forward and backward, registered as the
  ``torch.ops.fsc.jagged_attention_fwd`` / ``jagged_attention_bwd`` triton ops; the
  ``lower-attention`` pass lowers user attention to them. :func:`jagged_attention_reference`
  is its plain PyTorch reference; ``fsc.kernels.attention_grouped`` is what the op runs on
  CPU tensors (the same maths, sequences grouped by length).

The function shadows its module's name on this package: reach the module itself with
``importlib.import_module("fsc.kernels.jagged_attention")`` or ``from
fsc.kernels.jagged_attention import ...``. No pass lowers to these kernels yet.
"""

from fsc.kernels.jagged_attention import jagged_attention, jagged_attention_reference

__all__ = ["jagged_attention", "jagged_attention_reference"]
