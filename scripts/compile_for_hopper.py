"""Compile every W4A16 tile candidate for a Hopper GPU (sm_90) on this machine, no GPU needed.

    python scripts/compile_for_hopper.py [--dtype bf16 fp16] [--bits 4 8]

Triton's interpreter, which the CPU tests run the kernels in, accepts code its compiler refuses;
on a GPU the tuner skips a candidate that fails to compile, so such a failure would only show as
a slower kernel. Prints one line per candidate (the MMA instruction it got, shared memory, and
whether int-to-float conversions remain) and exits 1 if any fails or needs more shared memory than
Hopper has. Run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch


HOPPER_SHARED_MEMORY = 232_448  # bytes a block may use on sm_90 (227 KiB)


def compile_candidate(kernel, dtype: str, constants: dict, num_warps: int, num_stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {"x_ptr": f"*{dtype}", "qweight_ptr": "*i32", "scales_ptr": f"*{dtype}", "zeros_ptr": "*u8",
                 "out_ptr": f"*{dtype}", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
                 "stride_qk": "i32", "stride_sg": "i32", "stride_zg": "i32", "stride_split": "i32",
                 "stride_om": "i32"}
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(kernel, signature,
                       constexprs={(kernel.arg_names.index(name),): value for name, value in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 8], choices=[4, 8])
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile")
    from octavo.layers.quantization import triton_kernels

    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    failures = 0
    for dtype in args.dtype:
        for bits in args.bits:
            magic = triton_kernels.magic_bits(torch_dtypes[dtype], bits)
            for configs in triton_kernels._CANDIDATES.values():
                for config in configs:
                    block_m, block_n, block_k, warps, stages, gather, swap = config
                    constants = dict(GROUP_SIZE=128, BITS=bits, HAS_ZEROS=True, BLOCK_M=block_m, BLOCK_N=block_n,
                                     BLOCK_K=block_k, SPLIT_K=1, DOT_PRECISION="tf32", GATHER_WORDS=gather,
                                     SWAP_AB=swap, SCALE_AFTER_DOT=block_m < block_k, MAGIC=magic)
                    try:
                        binary = compile_candidate(triton_kernels._wna16_gemm_kernel, dtype, constants, warps, stages)
                    except Exception as error:  # report every failure, then exit 1
                        failures += 1
                        cause = error.__cause__ or error.__context__ or error
                        print(f"FAILED {dtype} {bits}-bit {config}: {str(cause).strip().splitlines()[-1]}")
                        continue
                    if binary.metadata.shared > HOPPER_SHARED_MEMORY:
                        failures += 1
                        print(f"FAILED {dtype} {bits}-bit {config}: needs {binary.metadata.shared} B of shared "
                              f"memory, over Hopper's {HOPPER_SHARED_MEMORY}; it can never be chosen there")
                        continue
                    ptx = binary.asm["ptx"]
                    mma = re.search(r"\b(wgmma|mma)\.", ptx)
                    conversions = len(re.findall(r"cvt\.rn\.(?:bf16|f16|f32)\.s32", ptx))
                    print(f"ok     {dtype} {bits}-bit {config}: {mma.group(1) if mma else 'no mma'}, "
                          f"shared {binary.metadata.shared} B, int-to-float conversions {conversions}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
