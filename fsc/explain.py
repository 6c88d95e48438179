"""``fsc.explain(model, *inputs, **options)``: compile a model with the ``freescale``
backend, run one forward (and, where outputs need grad, one backward) on the example
inputs with everything restored afterwards, and return the record of every subgraph.

Its own module because it calls the backend, which writes the records that
:mod:`fsc.inspect` holds: the records sit below the backend, ``explain`` above it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from fsc.backend import freescale
from fsc.inspect import STORE, CompileRecord
from fsc.verify import rng_devices


def explain(model: Any, *example_inputs: Any, **options: Any) -> CompileRecord:
    """Compile ``model`` with ``backend="freescale"`` and ``options``, run it once on
    ``example_inputs`` (and one backward where an output needs grad, so the backward graph
    is compiled too), and return the record of every subgraph.

    Nothing is trained and nothing is left changed: parameter and input ``.grad``, module
    buffers (e.g. BatchNorm statistics) and the random-number state are restored. In a
    distributed job every rank must call it alike: the compiled graphs run their
    collectives. Each call compiles afresh (a new backend object, so Dynamo cannot reuse
    an earlier compile); Dynamo's recompile limit still applies per model.
    """

    def backend(gm: Any, inputs: Any, **kwargs: Any) -> Any:  # a new identity per call
        return freescale(gm, inputs, **kwargs)

    module = model if isinstance(model, torch.nn.Module) else None
    leaves = list(module.parameters()) if module is not None else []
    leaves += [x for x in tree_flatten(example_inputs)[0] if isinstance(x, torch.Tensor) and x.requires_grad]
    saved_grads = [t.grad for t in leaves]
    saved_buffers = [(b, b.detach().clone()) for b in module.buffers()] if module is not None else []
    compiled = torch.compile(model, backend=backend, options=options or None)
    with STORE.collect() as record, torch.random.fork_rng(devices=rng_devices()):
        try:
            out = compiled(*example_inputs)
            flat, _ = tree_flatten(out)
            needs_grad = [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad]
            if needs_grad:
                torch.autograd.backward(needs_grad, [torch.ones_like(t) for t in needs_grad])
        finally:
            for t, g in zip(leaves, saved_grads):
                t.grad = g
            with torch.no_grad():
                for buffer, value in saved_buffers:
                    buffer.copy_(value)
    if not record.subgraphs:
        raise RuntimeError(
            "explain compiled nothing: Dynamo ran the model without calling the backend "
            "(recompile limit reached, or the model disabled compilation); see TORCH_LOGS=recompiles"
        )
    return record
