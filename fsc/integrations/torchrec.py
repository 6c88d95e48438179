"""TorchRec models through fsc: a ``DistributedModelParallel`` model compiled in one call.

::

    import fsc.integrations.torchrec as fsc_torchrec

    compiled = fsc_torchrec.compile(dmp, example_inputs=(kjt, dense), options={...})
    loss = compiled(kjt, dense)          # KJTs are prepared for tracing on the way in

:func:`compile` applies TorchRec's own PT2 recipe (the Dynamo settings TorchRec documents
for ``torch.compile``, synchronous collectives so the exchanges are functional collectives
in the graphs, ``kjt_for_pt2_tracing`` on every KeyedJaggedTensor argument), the
compatibility fixes below, one eager forward to finish TorchRec's lazy initialisation, and
``torch.compile(model, backend="freescale", fullgraph=True)``. The scheduling passes then
see TorchRec's all-to-alls like any others; the write-backs fbgemm's kernels leave at the
end of the graphs do not stop them (:mod:`fsc.analysis.safety`).

**Fixes.** Each is named, says why, applies only to the versions it was written for
(TorchRec 1.8.0, fbgemm-gpu 1.8.0), and only where it is still needed (it checks); the
names of those applied are in :func:`applied_fixes`. Remove a fix when upstream has it.

``fbgemm-fake-kernels``
    fbgemm-gpu-cpu registers its table-batched-embedding (TBE) ``*_pt2_wrapper`` ops
    without fake (meta) kernels, so Dynamo cannot trace a lookup. The fakes give the
    shapes the CPU kernels return: pooled ``[B, total_D]`` (``B`` from the offsets and the
    table count), sequence ``[len(indices), D]``, and an empty tensor from the backward
    ops, which update the tables in place (fused optimizer) and return no gradient.
``resize-awaitables-loop``
    ``get_resize_awaitables`` in ``torchrec/distributed/embedding_lookup.py`` filters with
    an assignment expression inside a comprehension, which Dynamo cannot trace on Python
    3.11; replaced by the same loop without it.
``sequence-all-to-all-equal-batches``
    ``SequenceEmbeddingsAllToAll`` (EmbeddingCollection's output exchange) branches on
    ``len(set(batch_size_per_rank)) > 1``, sizes that are data-dependent in a graph. The
    fix asserts equal batch sizes at run time (``torch._check``) and takes the equal-batch
    path: a step whose ranks hold different batch sizes fails (``TorchRecError`` naming
    the fix; a shape assertion derived from the same sizes may be the one that fires)
    instead of computing wrong rows. Variable batch sizes across ranks are not supported
    compiled.
``sequence-all-to-all-nonempty``
    ``all2all_sequence_sync`` branches on ``local_T > 0`` (the lengths this rank received),
    data-dependent too. The sharding plan settles it (a rank holding none of the sharding's
    features receives nothing; the others receive lengths unless the batch is empty), and
    it is asserted at run time the same way (an empty batch fails).
``warm-up``
    The first forward of a sharded module initialises its input distribution lazily (and
    logs); the compiled graph cannot contain that, so :func:`compile` runs one eager
    forward without gradients on ``example_inputs`` first.

TorchRec stays optional: nothing in fsc imports this module; it needs ``torchrec`` and
``fbgemm_gpu`` (``make test`` installs the versions above with ``--no-deps``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from typing import Any

import torch

from fsc.errors import FscError

__all__ = ["SUPPORTED", "TorchRecError", "applied_fixes", "compile", "prepare", "prepare_inputs"]

log = logging.getLogger(__name__)

#: the versions the fixes were written for (and tested with)
SUPPORTED = {"torchrec": "1.8.0", "fbgemm_gpu": "1.8.0"}

#: TorchRec's PT2 recipe: the Dynamo settings its documentation and tests compile with
DYNAMO_SETTINGS = {
    "capture_scalar_outputs": True,
    "capture_dynamic_output_shape_ops": True,
    "skip_torchrec": False,
    "force_unspec_int_unbacked_size_like_on_torchrec_kjt": True,
}


class TorchRecError(FscError, RuntimeError):
    """TorchRec or fbgemm-gpu is missing, or not a version the integration supports."""


@dataclasses.dataclass(frozen=True)
class Fix:
    name: str
    why: str
    needed: Callable[[], bool]
    apply: Callable[[], None]


_applied: list[str] = []


def applied_fixes() -> list[str]:
    """Names of the fixes applied in this process, in order."""
    return list(_applied)


def _versions() -> dict[str, str]:
    try:
        import fbgemm_gpu
        import torchrec
    except Exception as exc:  # ImportError, or fbgemm's libraries failing to load
        raise TorchRecError(f"fsc.integrations.torchrec needs torchrec and fbgemm_gpu ({type(exc).__name__}: {exc}); "
                            f"supported: torchrec=={SUPPORTED['torchrec']}, "
                            f"fbgemm-gpu(-cpu)=={SUPPORTED['fbgemm_gpu']}") from exc
    return {"torchrec": torchrec.__version__, "fbgemm_gpu": fbgemm_gpu.__version__}


def _on_supported_versions() -> bool:
    found = _versions()
    return all(found[name].split("+")[0] == version for name, version in SUPPORTED.items())


# ------------------------------------------------------------------ fbgemm fake kernels

_SPARSE_TYPE_DTYPES = {0: torch.float32, 1: torch.float16, 5: torch.bfloat16}


def _output_dtype(code: int) -> torch.dtype:
    try:
        return _SPARSE_TYPE_DTYPES[code]
    except KeyError:
        raise TorchRecError(f"fbgemm output_dtype {code} has no fake kernel here (known: fp32, fp16, bf16)") from None


def _pooled_forward_fake(host_weights, dev_weights, uvm_weights, lxu_cache_weights, weights_placements,
                         weights_offsets, D_offsets, total_D, max_D, hash_size_cumsum, indices, offsets, pooling_mode,
                         indice_weights, lxu_cache_locations, uvm_cache_stats, is_experimental, output_dtype):
    tables = D_offsets.shape[0] - 1
    batch = (offsets.shape[0] - 1) // tables
    return host_weights.new_empty((batch, total_D), dtype=_output_dtype(output_dtype))


def _sequence_forward_fake(host_weights, dev_weights, uvm_weights, lxu_cache_weights, weights_placements,
                           weights_offsets, D, hash_size_cumsum, indices, offsets, lxu_cache_locations,
                           uvm_cache_stats, is_experimental, output_dtype):
    return host_weights.new_empty((indices.shape[0], D), dtype=_output_dtype(output_dtype))


def _backward_fake(grad_output, *args, **kwargs):
    # The fused optimizer updates the weights in place; no gradient comes back.
    return grad_output.new_empty((0,))


_FAKES = {
    "split_embedding_codegen_forward_unweighted_pt2_wrapper": _pooled_forward_fake,
    "split_embedding_codegen_forward_weighted_pt2_wrapper": _pooled_forward_fake,
    "split_embedding_nobag_codegen_forward_unweighted_pt2_wrapper": _sequence_forward_fake,
}
_BACKWARD_PREFIXES = ("split_embedding_backward_codegen_", "split_embedding_nobag_backward_codegen_")


def _tbe_ops_without_fakes() -> list[str]:
    import fbgemm_gpu.split_table_batched_embeddings_ops_training  # noqa: F401  (loads the TBE ops)

    names = []
    for qualified in torch._C._dispatch_get_all_op_names():
        namespace, _, name = qualified.partition("::")
        if namespace != "fbgemm" or not name.endswith("_pt2_wrapper") or "vbe" in name:
            continue
        if name not in _FAKES and not name.startswith(_BACKWARD_PREFIXES):
            continue
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Meta"):
            continue
        if torch._library.simple_registry.singleton.find(qualified).fake_impl.kernel is not None:
            continue
        names.append(name)
    return sorted(names)


def _register_fakes() -> None:
    for name in _tbe_ops_without_fakes():
        torch.library.register_fake(f"fbgemm::{name}", _FAKES.get(name, _backward_fake))


# -------------------------------------------------------------- resize awaitables loop


def _lookup_classes() -> list[type]:
    from torchrec.distributed import embedding_lookup

    return [embedding_lookup.GroupedEmbeddingsLookup, embedding_lookup.GroupedPooledEmbeddingsLookup]


def _resize_awaitables(self: Any) -> list[Any]:
    out = []
    for module in self._emb_modules:
        if hasattr(module, "get_rs_awaitable"):
            awaitable = module.get_rs_awaitable()
            if awaitable is not None:
                out.append(awaitable)
    return out


def _uses_walrus_comprehension() -> bool:
    import inspect

    return any(":=" in inspect.getsource(cls.get_resize_awaitables) for cls in _lookup_classes()
               if cls.get_resize_awaitables is not _resize_awaitables)


def _replace_resize_awaitables() -> None:
    for cls in _lookup_classes():
        cls.get_resize_awaitables = _resize_awaitables


# ------------------------------------------------ sequence all-to-all: equal batch sizes


def _sequence_all_to_all() -> type:
    from torchrec.distributed.dist_data import SequenceEmbeddingsAllToAll

    return SequenceEmbeddingsAllToAll


def _equal_batches_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    def forward(self: Any, local_embs: torch.Tensor, lengths: torch.Tensor, input_splits: list[int],
                output_splits: list[int], unbucketize_permute_tensor: torch.Tensor | None = None,
                batch_size_per_rank: list[int] | None = None,
                sparse_features_recat: torch.Tensor | None = None) -> Any:
        # TorchRec asks len(set(batch_size_per_rank)) > 1 of sizes that are unbacked in a
        # graph; with equal batches it is False. Equality is asserted at run time, so a step
        # whose ranks hold different batch sizes fails instead of computing wrong rows.
        if batch_size_per_rank is not None:
            for size in batch_size_per_rank[1:]:
                torch._check(size == batch_size_per_rank[0], lambda: (
                    "fsc.integrations.torchrec: the ranks' batch sizes differ; the compiled sequence "
                    "embedding all-to-all (fix 'sequence-all-to-all-equal-batches') needs equal ones"))
        return original(self, local_embs, lengths, input_splits, output_splits, unbucketize_permute_tensor,
                        None, sparse_features_recat)

    forward.fsc_fix = True
    return forward


def _asks_variable_batch_size() -> bool:
    import inspect

    forward = _sequence_all_to_all().forward
    return not getattr(forward, "fsc_fix", False) and "len(set(batch_size_per_rank))" in inspect.getsource(forward)


def _assume_equal_batches() -> None:
    cls = _sequence_all_to_all()
    cls.forward = _equal_batches_forward(cls.forward)


def _nonempty_sequence_sync(original: Callable[..., Any]) -> Callable[..., Any]:
    def all2all_sequence_sync(pg: Any, a2ai: Any, sharded_input_embeddings: torch.Tensor) -> torch.Tensor:
        # TorchRec branches on `local_T > 0` (the lengths this rank received for the features
        # it holds), unbacked in a graph. The sharding plan settles it: a rank holding none
        # of this sharding's features has an empty recat buffer (its size is static) and
        # receives nothing; any other rank receives lengths unless the batch is empty.
        # Asserted at run time, so a step that breaks it fails with this message.
        local_t = a2ai.lengths_after_sparse_data_all2all.shape[0]
        recat = a2ai.forward_recat_tensor
        if recat is not None and recat.numel() == 0:
            torch._check(local_t == 0, lambda: (
                "fsc.integrations.torchrec: a rank that holds no features of a sequence sharding received "
                "lengths (fix 'sequence-all-to-all-nonempty')"))
        else:
            torch._check(local_t > 0, lambda: (
                "fsc.integrations.torchrec: a rank received no sequence lengths (empty batch); the compiled "
                "sequence embedding all-to-all (fix 'sequence-all-to-all-nonempty') needs a non-empty one"))
        return original(pg, a2ai, sharded_input_embeddings)

    all2all_sequence_sync.fsc_fix = True
    return all2all_sequence_sync


def _branches_on_local_t() -> bool:
    import inspect

    from torchrec.distributed import comm_ops

    function = comm_ops.all2all_sequence_sync
    return not getattr(function, "fsc_fix", False) and "if local_T > 0" in inspect.getsource(function)


def _assume_nonempty() -> None:
    from torchrec.distributed import comm_ops

    comm_ops.all2all_sequence_sync = _nonempty_sequence_sync(comm_ops.all2all_sequence_sync)


FIXES = (
    Fix("fbgemm-fake-kernels", "fbgemm's TBE pt2 wrapper ops have no fake kernels: Dynamo cannot trace a lookup",
        lambda: bool(_tbe_ops_without_fakes()), _register_fakes),
    Fix("resize-awaitables-loop", "get_resize_awaitables filters with := in a comprehension, which Dynamo cannot "
        "trace on Python 3.11", _uses_walrus_comprehension, _replace_resize_awaitables),
    Fix("sequence-all-to-all-equal-batches", "SequenceEmbeddingsAllToAll branches on len(set(batch sizes)), "
        "data-dependent in a graph: equal batch sizes are asserted at run time instead",
        _asks_variable_batch_size, _assume_equal_batches),
    Fix("sequence-all-to-all-nonempty", "all2all_sequence_sync branches on local_T > 0, data-dependent in a "
        "graph: a non-empty exchange is asserted at run time instead", _branches_on_local_t, _assume_nonempty),
)


def prepare() -> list[str]:
    """Apply TorchRec's PT2 recipe and the fixes this process still needs; returns the names
    of the fixes applied now. Idempotent. Raises :class:`TorchRecError` when TorchRec or
    fbgemm-gpu is missing or not a supported version (the fixes are version-specific)."""
    if not _on_supported_versions():
        raise TorchRecError(f"fsc.integrations.torchrec supports {SUPPORTED}, found {_versions()}: its "
                            "compatibility fixes are written for those versions")
    from torchrec.distributed.comm_ops import set_use_sync_collectives

    for key, value in DYNAMO_SETTINGS.items():
        setattr(torch._dynamo.config, key, value)
    set_use_sync_collectives(True)
    now = []
    for fix in FIXES:
        if fix.needed():
            fix.apply()
            now.append(fix.name)
            _applied.append(fix.name)
            log.info("fsc.integrations.torchrec: applied %s (%s)", fix.name, fix.why)
    return now


def prepare_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Every KeyedJaggedTensor argument through TorchRec's ``kjt_for_pt2_tracing`` (lengths
    and offsets marked for tracing, so batches of new sizes do not recompile)."""
    from torchrec.pt2.utils import kjt_for_pt2_tracing
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    def convert(value: Any) -> Any:
        return kjt_for_pt2_tracing(value) if isinstance(value, KeyedJaggedTensor) else value

    return tuple(convert(a) for a in args), {k: convert(v) for k, v in kwargs.items()}


#: a failed run-time assertion on unbacked sizes (Dynamo's message, or Inductor's bare expression)
_ASSERTION = re.compile(r"Runtime assertion failed|batch sizes differ|no sequence lengths|^(Eq|Ne|Mod)\(.*\bu\d+\b")


class Compiled(torch.nn.Module):
    """The compiled model; its forward prepares KeyedJaggedTensor arguments for tracing."""

    def __init__(self, model: torch.nn.Module, compiled: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self._compiled = compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = prepare_inputs(args, kwargs)
        try:
            return self._compiled(*args, **kwargs)
        except RuntimeError as exc:
            if not _ASSERTION.search(str(exc)):
                raise
            raise TorchRecError(
                f"a run-time assertion of the compiled TorchRec model failed ({exc}). The graph holds for "
                "what its fixes assert: the same batch size on every rank and no empty batch "
                "('sequence-all-to-all-equal-batches', 'sequence-all-to-all-nonempty'); a shape check "
                "derived from them may fire first") from exc


def compile(model: torch.nn.Module, example_inputs: tuple, *, options: dict[str, Any] | None = None,
            example_kwargs: dict[str, Any] | None = None, **compile_kwargs: Any) -> Compiled:
    """``model`` (a ``DistributedModelParallel`` or a module holding sharded TorchRec modules)
    compiled by fsc with ``fullgraph=True``: :func:`prepare`, one eager forward without
    gradients on ``example_inputs`` (TorchRec's lazy initialisation), then
    ``torch.compile(model, backend="freescale", options=options, fullgraph=True,
    **compile_kwargs)``."""
    prepare()
    with torch.no_grad():
        model(*example_inputs, **(example_kwargs or {}))
    if "warm-up" not in _applied:
        _applied.append("warm-up")
    compiled = torch.compile(model, backend="freescale", options=options, fullgraph=True, **compile_kwargs)
    return Compiled(model, compiled)
