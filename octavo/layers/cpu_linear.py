"""Float32 linear layers on the CPU with each weight packed once at load.

``torch.nn.functional.linear`` on a float32 CPU tensor calls a BLAS GEMM that repacks the
weight on every call. At a few rows (a decode step) that repacking is most of the work: the
weight is read, written to a packed buffer and read again. Three prepacked forms, by rows:

- 57..64 rows (a full decode batch of 64): MKL's packed GEMM (``torch.ops.mkl._mkl_linear`` on
  a weight packed once by ``cblas_sgemm_pack`` for 64 rows; fewer rows are padded to 64, since
  the packed weight serves that one row count only). ``OCTAVO_CPU_MKL_PACKED=0`` turns it off.
- 2..512 rows otherwise: ``cpu_gemm``'s AVX-512 kernel (faster than oneDNN and ``F.linear`` from
  8 to 256 rows, even with them at 512, table there). ``OCTAVO_CPU_GEMM=0``, or a CPU without
  AVX-512F, leaves the oneDNN form below.
- without that kernel, oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise`` on a weight
  reordered once by ``_reorder_linear_weight``), where it beats ``F.linear``. Measured on a 2-core
  AVX-512 machine, SmolLM2-135M's shapes, all 30 layers' weights plus the 49152 x 576 output
  projection, ms per step:

  ======  ==========  ======  =========================================================
  rows    F.linear    oneDNN  per layer
  ======  ==========  ======  =========================================================
  1       23.2        28.5    oneDNN slower on every layer
  8       53.5        34.3    faster on all but ``o_proj`` / ``down_proj`` (about even)
  32      68.3        57.0    faster or even on every layer
  64      96.7        90.4    faster on ``gate_up_proj`` and the output projection only
  512     486.9       482.2   even
  ======  ==========  ======  =========================================================

  so ``use_onednn`` picks it for 2..48 rows, and above that only for wide layers (at least four
  outputs per input: the gate/up projection, the output projection) up to 128 rows.

One row keeps ``F.linear`` (BLAS's GEMV reads the plain weight once, about even with the
kernel), and so do prompt chunks past 512 rows. The plain weight stays for those and for tied embeddings, so a
prepacked layer holds its weight three times with MKL's copy (about 1.1 GB more than the plain
weights for the default model), twice without; the copies are kept only as far as they fit in
half the memory available at load (MKL's goes first), so a large float32 model keeps its plain
weights alone.

``OCTAVO_CPU_ONEDNN_LINEAR=0`` turns every prepacked form off (the reference: ``F.linear``
everywhere). The GPU path never comes here: only float32 layers on the CPU are prepacked.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from octavo.layers import cpu_gemm
from octavo.layers.cpu_extension import available_memory_bytes, switch_on
from octavo.layers.quantization.base import UnquantizedLinearMethod

logger = logging.getLogger(__name__)

ENV_SWITCH = "OCTAVO_CPU_ONEDNN_LINEAR"
MKL_ENV_SWITCH = "OCTAVO_CPU_MKL_PACKED"
MKL_PACKED_ROWS = 64  # the row count the MKL weight is packed for
MKL_MIN_ROWS = 57  # from here to MKL_PACKED_ROWS rows, padded to MKL_PACKED_ROWS
MIN_ROWS = 2  # one row: the BLAS GEMV reads the plain weight once, faster than oneDNN
MAX_ROWS_ANY = 48  # up to here oneDNN for every layer
MAX_ROWS_WIDE = 128  # up to here for layers with out_features >= WIDE_RATIO * in_features
COPIES_MAX_SHARE = 0.5  # of the memory available at load, at most, for the packed copies together
GEMM_MAX_ROWS = 512  # cpu_gemm measured even with F.linear at 512 rows; longer chunks keep the plain weight
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


def prepacking_enabled() -> bool:
    """The master switch: ``OCTAVO_CPU_ONEDNN_LINEAR=0`` keeps ``F.linear`` everywhere."""
    return switch_on(ENV_SWITCH)


def onednn_linear_enabled() -> bool:
    """The switch (on unless ``OCTAVO_CPU_ONEDNN_LINEAR=0``) and the kernels being there."""
    return prepacking_enabled() and onednn_linear_available()


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


class PrepackedLinearMethod(UnquantizedLinearMethod):
    """``UnquantizedLinearMethod`` whose ``apply`` reads a prepacked copy of ``layer.weight``:
    ``layer.mkl_weight`` for a full decode batch (``use_mkl_packed``), then ``layer.gemm_weight``
    (``cpu_gemm``'s layout) for 2..``GEMM_MAX_ROWS`` rows, or, where that kernel is not built,
    ``layer.onednn_weight`` where ``use_onednn`` says so; the plain weight otherwise."""

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
            gemm_weight = getattr(layer, "gemm_weight", None)
            if gemm_weight is not None:
                if MIN_ROWS <= rows <= GEMM_MAX_ROWS:
                    return cpu_gemm.linear(x, gemm_weight, layer.out_features, bias)
            else:
                onednn_weight = getattr(layer, "onednn_weight", None)
                if onednn_weight is not None and use_onednn(rows, layer.out_features, layer.in_features):
                    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), onednn_weight, bias, "none", [], "")
        return nn.functional.linear(x, layer.weight, bias)


def _prepackable(module: nn.Module) -> bool:
    from octavo.layers.linear import Linear

    return (isinstance(module, Linear) and type(module.quant_method) is UnquantizedLinearMethod
            and not module.reduce_output and not module.sharded
            and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu")


def _copies_that_fit(copy_bytes: int, wanted: int) -> int:
    """How many of ``wanted`` packed copies of ``copy_bytes`` each fit in COPIES_MAX_SHARE of the
    memory available now (a large float32 model keeps its plain weights alone, with a warning)."""
    available = available_memory_bytes()
    if available is None:
        return wanted  # off Linux: no way to tell, as before
    fitting = min(wanted, int(COPIES_MAX_SHARE * available // max(copy_bytes, 1)))
    if fitting < wanted:
        logger.warning("%d of %d packed float32 weight copies (%.1f GiB each) fit in %.0f%% of the %.1f GiB "
                       "available; the rest of the fast paths stay off", fitting, wanted, copy_bytes / 2**30,
                       100 * COPIES_MAX_SHARE, available / 2**30)
    return fitting


def prepack_cpu_linears(model: nn.Module) -> int:
    """Give every float32 CPU ``Linear`` a prepacked copy of its weight (``cpu_gemm``'s layout,
    or oneDNN's where that kernel is not built; MKL's for full decode batches too) and the
    method that uses them; returns how many layers were prepacked."""
    method = PrepackedLinearMethod()
    modules = [module for module in model.modules() if _prepackable(module)]
    if not modules:
        return 0
    mkl = mkl_packed_enabled()
    gemm = cpu_gemm.load_gemm()
    onednn = not gemm and onednn_linear_available()
    copy_bytes = sum(module.weight.numel() * module.weight.element_size() for module in modules)
    copies = _copies_that_fit(copy_bytes, 1 + mkl)
    if copies == 0 or not (mkl or gemm or onednn):
        return 0
    if copies == 1 and mkl and (gemm or onednn):
        mkl = False  # the full-batch MKL band is the smaller gain: it goes first
    for module in modules:
        weight = module.weight.detach()
        with torch.no_grad():  # plain attributes: the packed copies are not parameters
            if gemm:
                module.gemm_weight = cpu_gemm.pack(weight)
            elif onednn:  # an opaque oneDNN tensor
                module.onednn_weight = torch.ops.mkldnn._reorder_linear_weight(weight, 8)
            if mkl:
                module.mkl_weight = torch.ops.mkl._mkl_reorder_linear_weight(weight, MKL_PACKED_ROWS)
        module.quant_method = method
    logger.info("packed %d float32 linear weights for %s%s", len(modules),
                "the AVX-512 GEMM" if gemm else "oneDNN" if onednn else "no GEMM", " and MKL" if mkl else "")
    return len(modules)
