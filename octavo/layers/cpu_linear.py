"""Float32 linear layers on the CPU through oneDNN, with each weight reordered once at load.

``torch.nn.functional.linear`` on a float32 CPU tensor calls a BLAS GEMM that repacks the
weight on every call. At a few rows (a decode step) that repacking is most of the work: the
weight is read, written to a packed buffer and read again. oneDNN's inner product
(``torch.ops.mkldnn._linear_pointwise``) can take the weight already in its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``), so it streams the weight once.

Measured on a 2-core AVX-512 machine, SmolLM2-135M's shapes, all 30 layers' weights (so none
stays in cache) plus the 49152 x 576 output projection, ms per step:

======  ==========  ======  =========================================================
rows    F.linear    oneDNN  per layer
======  ==========  ======  =========================================================
1       23.2        28.5    oneDNN slower on every layer
8       53.5        34.3    faster on all but ``o_proj`` / ``down_proj`` (about even)
32      68.3        57.0    faster or even on every layer
64      96.7        90.4    faster on ``gate_up_proj`` and the output projection only
512     486.9       482.2   even
======  ==========  ======  =========================================================

so ``use_onednn`` picks oneDNN for 2..48 rows, and above that only for wide layers (at least
four outputs per input: the gate/up projection, the output projection) up to 128 rows. The
plain weight stays (one row, long prompt chunks, tied embeddings), so a prepacked layer holds
its weight twice.

A full decode batch of 57..64 rows goes to MKL's packed GEMM instead (``torch.ops.mkl._mkl_linear``
on a weight packed once by ``cblas_sgemm_pack`` for 64 rows; fewer rows are padded to 64, since
the packed weight serves that one row count only). Same machine, all layers at 64 rows:
``F.linear`` 104.7 ms, oneDNN 97.3, the per-layer choice above 89.5, MKL packed 77.3 (faster
on every layer). It holds a third copy of the weights (about 540 MB more for the default model);
``OCTAVO_CPU_MKL_PACKED=0`` leaves those rows on the choice above.

``OCTAVO_CPU_ONEDNN_LINEAR=0`` turns both paths off (the reference: ``F.linear`` everywhere).
The GPU path never comes here: only float32 layers on the CPU are prepacked.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from octavo.layers.cpu_extension import switch_on
from octavo.layers.quantization.base import UnquantizedLinearMethod

logger = logging.getLogger(__name__)

ENV_SWITCH = "OCTAVO_CPU_ONEDNN_LINEAR"
MKL_ENV_SWITCH = "OCTAVO_CPU_MKL_PACKED"
MKL_PACKED_ROWS = 64  # the row count the MKL weight is packed for
MKL_MIN_ROWS = 57  # from here to MKL_PACKED_ROWS rows, padded to MKL_PACKED_ROWS
MIN_ROWS = 2  # one row: the BLAS GEMV reads the plain weight once, faster than oneDNN
MAX_ROWS_ANY = 48  # up to here oneDNN for every layer
MAX_ROWS_WIDE = 128  # up to here for layers with out_features >= WIDE_RATIO * in_features
WIDE_RATIO = 4

_mkldnn = getattr(torch.ops, "mkldnn", None)
_reorder = getattr(_mkldnn, "_reorder_linear_weight", None) if _mkldnn is not None else None
_linear_pointwise = getattr(_mkldnn, "_linear_pointwise", None) if _mkldnn is not None else None


def onednn_linear_available() -> bool:
    if not torch.backends.mkldnn.is_available() or _linear_pointwise is None:
        return False
    try:  # the op namespace resolves lazily: ask for the reorder op itself
        return torch.ops.mkldnn._reorder_linear_weight is not None
    except (AttributeError, RuntimeError):
        return False


def onednn_linear_enabled() -> bool:
    """The switch (on unless ``OCTAVO_CPU_ONEDNN_LINEAR=0``) and the kernels being there."""
    return switch_on(ENV_SWITCH) and onednn_linear_available()


def mkl_packed_available() -> bool:
    mkl = getattr(torch.ops, "mkl", None)
    if not torch.backends.mkl.is_available() or mkl is None:
        return False
    try:
        return torch.ops.mkl._mkl_reorder_linear_weight is not None and torch.ops.mkl._mkl_linear is not None
    except (AttributeError, RuntimeError):
        return False


def mkl_packed_enabled() -> bool:
    return switch_on(MKL_ENV_SWITCH) and mkl_packed_available()


def use_mkl_packed(rows: int) -> bool:
    return MKL_MIN_ROWS <= rows <= MKL_PACKED_ROWS


def use_onednn(rows: int, out_features: int, in_features: int) -> bool:
    """Whether a step of ``rows`` rows runs through the reordered weight (see the table above)."""
    if rows < MIN_ROWS:
        return False
    if rows <= MAX_ROWS_ANY:
        return True
    return rows <= MAX_ROWS_WIDE and out_features >= WIDE_RATIO * in_features


class OneDNNLinearMethod(UnquantizedLinearMethod):
    """``UnquantizedLinearMethod`` whose ``apply`` reads ``layer.onednn_weight`` (the plain
    ``layer.weight`` reordered by oneDNN) where ``use_onednn`` says so."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        rows = x.shape[0]
        if x.dtype == torch.float32 and x.dim() == 2:
            mkl_weight = getattr(layer, "mkl_weight", None)
            if mkl_weight is not None and use_mkl_packed(rows):
                if rows < MKL_PACKED_ROWS:
                    padded = x.new_zeros(MKL_PACKED_ROWS, x.shape[1])
                    padded[:rows] = x
                    return torch.ops.mkl._mkl_linear(padded, mkl_weight, layer.weight, bias, MKL_PACKED_ROWS)[:rows]
                return torch.ops.mkl._mkl_linear(x.contiguous(), mkl_weight, layer.weight, bias, MKL_PACKED_ROWS)
            if use_onednn(rows, layer.out_features, layer.in_features):
                return torch.ops.mkldnn._linear_pointwise(x.contiguous(), layer.onednn_weight, bias, "none", [], "")
        return nn.functional.linear(x, layer.weight, bias)


def _prepackable(module: nn.Module) -> bool:
    from octavo.layers.linear import Linear

    return (isinstance(module, Linear) and type(module.quant_method) is UnquantizedLinearMethod
            and not module.reduce_output and not module.sharded
            and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu")


def prepack_cpu_linears(model: nn.Module) -> int:
    """Give every float32 CPU ``Linear`` a oneDNN-reordered copy of its weight and the method
    that uses it; returns how many layers were prepacked."""
    method = OneDNNLinearMethod()
    packed = 0
    mkl = mkl_packed_enabled()
    for module in model.modules():
        if not _prepackable(module):
            continue
        with torch.no_grad():
            reordered = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), 8)
            if mkl:  # a plain attribute too: the packed buffer is not a parameter
                module.mkl_weight = torch.ops.mkl._mkl_reorder_linear_weight(module.weight.detach(), MKL_PACKED_ROWS)
        module.onednn_weight = reordered  # an opaque oneDNN tensor: a plain attribute, not a buffer
        module.quant_method = method
        packed += 1
    if packed:
        logger.info("reordered %d float32 linear weights for oneDNN", packed)
    return packed
