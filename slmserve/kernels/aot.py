"""Compile the Triton kernels ahead of time for a GPU target, on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``) runs the kernels in CI but never compiles them, so an
op the compiler rejects, too much shared memory or register spills would first show on a GPU.
Triton ships ``ptxas``, so the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) runs on a
CPU for an explicit target such as Hopper (``GPUTarget("cuda", 90, 32)``).

To compile what the engine really launches, the public wrappers (:func:`store_kv`,
:func:`extend_attention`, :func:`decode_attention`) are called on small CPU tensors with their
kernels swapped for recorders; each recorded launch is then specialised by Triton's own binder
(pointer dtypes, 16-divisibility of pointers and integers, integers equal to 1) and compiled.
That binder and ``JITFunction._pack_args`` are Triton internals (the same in 3.6 and 3.9).

Run in a process where ``TRITON_INTERPRET`` is unset (it is read when a kernel is decorated):
``python -m slmserve.kernels.aot`` prints one line per kernel and variant.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

import torch

SHARED_LIMIT_SM90 = 227 * 1024  # opt-in shared memory per block on H100/H200 (228 KB per SM)


@dataclass(frozen=True)
class Variant:
    """A model shape and dtype to compile the kernels for."""

    name: str
    dtype: torch.dtype
    heads: int
    kv_heads: int
    head_dim: int
    num_splits: int


# Qwen3-0.6B (16/8 heads, head_dim 128, GROUP 2) in bf16 as served; its OSSCAR variant (4 KV
# heads, GROUP 4); float32 (IEEE products) and head_dim 64 (BLOCK_D 64) as the tests use.
VARIANTS = (
    Variant("bf16-d128-g2", torch.bfloat16, 16, 8, 128, 16),
    Variant("bf16-d128-g4", torch.bfloat16, 16, 4, 128, 4),
    Variant("fp32-d64-g2", torch.float32, 8, 4, 64, 2),
    Variant("bf16-d64-g2", torch.bfloat16, 8, 4, 64, 1),
)


@dataclass
class Launch:
    """One kernel launch as a wrapper issued it."""

    kernel: Any  # triton JITFunction
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class Report:
    """What ptxas says about one compiled kernel (its ``-v`` output) plus Triton's metadata."""

    kernel: str
    variant: str
    arch: str
    cubin_bytes: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0  # Triton's allocation (dynamic shared memory at launch)
    ptxas_smem_bytes: int = 0  # static shared memory ptxas reports
    num_warps: int = 0
    num_stages: int = 0
    error: str = ""  # the compiler's message when this launch failed to compile


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` only records the call."""

    def __init__(self, kernel: Any, sink: list[Launch]) -> None:
        self.kernel = kernel
        self.sink = sink

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.sink.append(Launch(self.kernel, args, kwargs))

        return launch


@contextmanager
def _recording(module: ModuleType, names: list[str], sink: list[Launch]) -> Iterator[None]:
    originals = {name: getattr(module, name) for name in names}
    try:
        for name, kernel in originals.items():
            setattr(module, name, _Recorder(kernel, sink))
        yield
    finally:
        for name, kernel in originals.items():
            setattr(module, name, kernel)


def record_launches(variant: Variant) -> list[Launch]:
    """Call the wrappers as a mixed step would (a few tokens, small pool, int64 indices) and
    return the kernel launches they issue, in order: store, decode partial/merge, extend, then
    the fused element-wise kernels (add + RMSNorm, q/k norm + rotary, SiLU-and-mul) at the
    variant's widths (hidden = heads x head_dim / 2 and MLP = 3 x hidden, as in Qwen3-0.6B)."""
    from slmserve.kernels import decode, extend, fused, kv_store

    dt, hd = variant.dtype, variant.head_dim
    tokens, slots = 8, 64
    q = torch.zeros(tokens, variant.heads, hd, dtype=dt)
    k = torch.zeros(tokens, variant.kv_heads, hd, dtype=dt)
    k_pool = torch.zeros(slots, variant.kv_heads, hd, dtype=dt)
    v_pool = torch.zeros_like(k_pool)
    out = torch.empty_like(q)
    idx = torch.arange(tokens, dtype=torch.int64)
    cu = torch.tensor([0, 1, tokens], dtype=torch.int64)
    seqs = torch.tensor([0], dtype=torch.int64)
    scale = hd**-0.5
    sink: list[Launch] = []
    with (
        _recording(kv_store, ["_store_kv_kernel"], sink),
        _recording(decode, ["_decode_partial_kernel", "_decode_merge_kernel"], sink),
        _recording(extend, ["_extend_kernel"], sink),
        _recording(fused, ["_add_rms_norm_kernel", "_norm_rope_kernel", "_silu_mul_kernel"], sink),
    ):
        kv_store.store_kv(k, k.clone(), k_pool, v_pool, idx)
        decode.decode_attention(
            q, k_pool, v_pool, out, seqs=seqs, rows=seqs, cu_ctx=cu, context_slots=idx,
            scale=scale, num_splits=variant.num_splits,
        )  # fmt: skip
        extend.extend_attention(
            q, k_pool, v_pool, out, seqs=seqs + 1, max_new=tokens - 1, cu_new=cu, cu_ctx=cu,
            context_slots=idx, scale=scale,
        )  # fmt: skip
        hidden = variant.heads * hd // 2
        h = torch.zeros(tokens, hidden, dtype=dt)
        fused.add_rms_norm(h, torch.ones(hidden, dtype=dt), 1e-6, residual=h.clone())
        cos = torch.zeros(tokens, hd, dtype=dt)
        fused.norm_rope(q, torch.ones(hd, dtype=dt), 1e-6, cos, cos)
        gate = torch.zeros(tokens, 3 * hidden, dtype=dt)
        fused.silu_mul(gate, gate.clone())
    return sink


def compile_launch(launch: Launch, target: Any) -> tuple[Any, str]:
    """Specialise ``launch`` exactly as the JIT would at run time, compile it for ``target``
    (never from Triton's cache) and return the kernel with the ``ptxas -v`` log of its build.

    Raises whatever Triton raises (a compile error names the kernel and the failing op)."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, launch.kwargs, bound, specialization, options
    )
    src = ASTSource(fn, signature, constexprs, attrs)
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    log = io.StringIO()
    try:
        # Triton runs ptxas with -v and prints its log only when asked to.
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
    return compiled, log.getvalue()


def ptxas_path(capability: int = 90) -> str | None:
    """The ``ptxas`` Triton uses for ``capability``, or None without triton or its ptxas."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(capability).path
    except (ImportError, RuntimeError):
        return None


def ptxas_usage(log: str) -> dict[str, int]:
    """Registers, spills, stack and static shared memory from a ``ptxas -v`` log."""

    def grab(pattern: str) -> int:
        found = re.search(pattern, log)
        if found is None:
            raise ValueError(f"ptxas -v output has no {pattern!r}:\n{log}")
        return int(found.group(1))

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack_bytes": grab(r"(\d+) bytes stack frame"),
        "ptxas_smem_bytes": grab(r"(\d+) bytes smem") if "bytes smem" in log else 0,
    }


def compile_all(capability: int = 90, variants: tuple[Variant, ...] = VARIANTS) -> list[Report]:
    """Compile every kernel launch of every variant for ``cuda:capability``; one report each
    (a launch that fails to compile gives a report whose ``error`` holds the message)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    from slmserve.kernels import interpreter_enabled

    if interpreter_enabled():
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    target = GPUTarget("cuda", capability, 32)
    arch = sm_arch_from_capability(capability)
    reports = []
    for variant in variants:
        for launch in record_launches(variant):
            try:
                compiled, log = compile_launch(launch, target)
            except Exception as exc:  # reported per kernel, not fatal
                error = f"{type(exc).__name__}: {exc}"
                reports.append(Report(launch.kernel.__name__, variant.name, arch, error=error))
                continue
            meta = compiled.metadata
            reports.append(
                Report(
                    kernel=launch.kernel.__name__,
                    variant=variant.name,
                    arch=arch,
                    cubin_bytes=len(compiled.asm["cubin"]),
                    shared_bytes=meta.shared,
                    num_warps=meta.num_warps,
                    num_stages=meta.num_stages,
                    **ptxas_usage(log),
                )
            )
    return reports


def main() -> None:
    """Print one JSON object per compiled kernel (``--json``) or a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capability", type=int, default=90)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()
    reports = compile_all(args.capability)
    for r in reports:
        if args.json:
            print(json.dumps(asdict(r)))
        elif r.error:
            print(f"{r.kernel:24} {r.variant:14} {r.arch} FAILED: {r.error}")
        else:
            print(
                f"{r.kernel:24} {r.variant:14} {r.arch} regs {r.registers:3} "
                f"spill {r.spill_stores}/{r.spill_loads} B stack {r.stack_bytes} B "
                f"smem {r.shared_bytes} B warps {r.num_warps} stages {r.num_stages} "
                f"cubin {r.cubin_bytes} B"
            )


if __name__ == "__main__":
    main()
