"""Ahead-of-time compilation of the engine's Triton kernels for sm_90 / sm_80, on a machine with no GPU.

Triton compiles for any ``GPUTarget`` without a device; what it cannot tell without one is whether the kernel
will load: the shared-memory check (``CompiledKernel._init_handles``) runs only at first launch. So every launch
configuration is compiled here with what the runtime JIT would specialise (same warps, stages, divisibility-16
attributes), and ptxas's resource report says how many registers it needs and whether it spills.

``python -m minicpmv.engine.kernels.aot [--arch 90 80] [--json PATH]`` prints one row per configuration and arch
and exits 1 if any has a problem (or fails to compile).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from minicpmv.engine.kernels.spec import LaunchSpec

# Opt-in maximum of shared memory per block (static + dynamic), bytes: what Triton's launcher checks a kernel's
# ``metadata.shared`` against (CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, triton/backends/nvidia/
# driver.c; the check is triton/compiler/compiler.py ``_init_handles``). H100: 227 KiB, A100: 163 KiB (CUDA C
# Programming Guide, compute capabilities table); torch's inductor_utils identifies the two GPUs by exactly these
# values (IS_H100: 232448, IS_A100: 166912).
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}

_DIVISIBILITY_16 = [["tt.divisibility", 16]]  # what the JIT's parse_attr("D") gives (triton/backends/compiler.py)


@dataclass
class AotReport:
    """What one configuration needs on one arch: shared memory (Triton's allocation plus any static shared
    memory ptxas reports), registers per thread and spill bytes from ``ptxas -v``, and the compile time (Triton's
    and ptxas's; small when Triton's cache already holds the kernel)."""

    name: str
    arch: int
    shared_bytes: int
    registers: int
    spill_stores: int
    spill_loads: int
    seconds: float
    ptx_target: str  # the PTX ``.target``: "sm_90a" for arch 90 (Triton compiles Hopper with its "a" features)
    cubin_bytes: int = 0

    def problems(self) -> list[str]:
        """Why the configuration is unfit to ship: it would not launch (shared memory over the limit), it spills
        registers to local memory (slow), or ptxas produced no binary. Empty when fit."""
        where = f"{self.name} on sm_{self.arch}"
        found = []
        limit = SHARED_MEMORY_LIMIT[self.arch]
        if self.shared_bytes > limit:
            found.append(f"{where}: shared memory {self.shared_bytes} B exceeds the {limit} B per-block limit")
        if self.spill_stores or self.spill_loads:
            found.append(
                f"{where}: register spills ({self.spill_stores} B stores, {self.spill_loads} B loads"
                f" at {self.registers} registers)"
            )
        if not self.cubin_bytes:
            found.append(f"{where}: no cubin")
        return found


def _jit_function(kernel):
    """The JITFunction under any autotune/heuristics wrappers (they keep it in ``.fn``)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _source(spec: LaunchSpec):
    """The ASTSource the JIT would build: every argument in order, constexprs typed "constexpr", and
    ``tt.divisibility`` 16 on the arguments of ``spec.divisible_by_16`` (attrs keyed by argument-index path)."""
    import triton

    fn = _jit_function(spec.kernel)
    names = list(fn.arg_names)
    unknown = (set(spec.signature) | set(spec.constexprs) | set(spec.divisible_by_16)) - set(names)
    missing = [n for n in names if n not in spec.signature and n not in spec.constexprs]
    not_args = [n for n in spec.divisible_by_16 if n not in spec.signature]
    if unknown or missing or not_args:
        raise ValueError(
            f"{spec.name}: spec does not match {fn.__name__}{tuple(names)}: unknown {sorted(unknown)},"
            f" missing {missing}, divisible_by_16 not in signature {not_args}"
        )
    signature = {n: "constexpr" if n in spec.constexprs else spec.signature[n] for n in names}
    attrs = {(names.index(n),): _DIVISIBILITY_16 for n in spec.divisible_by_16}
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)


def _ptxas_report(ptx: str, target: str, arch: int, metadata) -> str:
    """``ptxas -v`` on the PTX with the flags Triton's make_cubin uses (so the numbers are the shipped cubin's)."""
    from triton.backends.nvidia.compiler import get_ptxas

    flags = ["-lineinfo"]
    if not metadata.enable_fp_fusion:
        flags.append("--fmad=false")
    if metadata.ptx_options:
        flags += metadata.ptx_options.split()
    with tempfile.TemporaryDirectory(prefix="minicpmv-aot-") as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, *flags, "-v", f"--gpu-name={target}", str(src), "-o", str(Path(tmp, "k.cubin"))]
        run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"ptxas failed ({run.returncode}): {' '.join(cmd)}\n{run.stderr}{run.stdout}")
    return run.stdout + run.stderr


def _ints(pattern: str, text: str) -> list[int]:
    return [int(x) for x in re.findall(pattern, text)]


def compile_spec(spec: LaunchSpec, arch: int) -> AotReport:
    """Compile ``spec`` for sm_``arch`` (GPUTarget("cuda", arch, 32)) and measure it. Compilation errors
    (CompilationError, PTXASError, ...) propagate as raised by Triton; resource overuse does not raise (Triton
    only checks it at launch), it shows in ``AotReport.problems()``."""
    import triton
    from triton.backends.compiler import GPUTarget

    if arch not in SHARED_MEMORY_LIMIT:
        raise ValueError(f"arch {arch}: no shared-memory limit known (have {sorted(SHARED_MEMORY_LIMIT)})")
    start = time.perf_counter()
    compiled = triton.compile(
        _source(spec),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    ptx = compiled.asm.get("ptx")
    match = re.search(r"^\.target\s+(\w+)", ptx or "", re.MULTILINE)
    if match is None:  # e.g. a cache filled with TRITON_STORE_BINARY_ONLY=1 keeps no PTX
        raise RuntimeError(f"{spec.name}: Triton returned no PTX with a .target for sm_{arch}")
    target = match.group(1)
    log = _ptxas_report(ptx, target, arch, compiled.metadata)
    seconds = time.perf_counter() - start
    registers = _ints(r"Used (\d+) registers", log)
    if not registers:
        raise RuntimeError(f"{spec.name}: no register count in the ptxas report:\n{log}")
    return AotReport(
        name=spec.name,
        arch=arch,
        shared_bytes=compiled.metadata.shared + sum(_ints(r"(\d+) bytes smem", log)),
        registers=max(registers),
        spill_stores=sum(_ints(r"(\d+) bytes spill stores", log)),
        spill_loads=sum(_ints(r"(\d+) bytes spill loads", log)),
        seconds=seconds,
        ptx_target=target,
        cubin_bytes=len(compiled.asm.get("cubin") or b""),
    )


def main(argv: list[str] | None = None) -> int:
    """Compile every ``launch_configs()`` entry for each arch, print a table, return 1 on any problem."""
    from minicpmv.engine.kernels import launch_configs

    parser = argparse.ArgumentParser(prog="python -m minicpmv.engine.kernels.aot", description=main.__doc__)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_MEMORY_LIMIT))
    parser.add_argument("--json", type=Path, help="also write the reports (and their problems) here")
    args = parser.parse_args(argv)

    specs = launch_configs()
    width = max((len(s.name) for s in specs), default=4)
    print(f"{'name':<{width}}  arch  shared KiB  regs  spills st/ld  seconds")
    rows, failures = [], []
    for arch in args.arch:
        for spec in (s for s in specs if arch in s.archs):  # e.g. an FP8 KV pool: Hopper only
            try:
                report = compile_spec(spec, arch)
            except Exception as e:  # a kernel that does not compile is a failure to report, not to stop on
                failures.append(f"{spec.name} on sm_{arch}: {type(e).__name__}: {str(e).strip()}")
                print(f"{spec.name:<{width}}  {arch:>4}  FAILED: {type(e).__name__}")
                continue
            problems = report.problems()
            failures += problems
            rows.append({**asdict(report), "problems": problems})
            spills = f"{report.spill_stores}/{report.spill_loads}"
            print(
                f"{spec.name:<{width}}  {arch:>4}  {report.shared_bytes / 1024:>10.1f}  {report.registers:>4}"
                f"  {spills:>12}  {report.seconds:>7.2f}{'  PROBLEM' if problems else ''}"
            )
    if args.json:
        args.json.write_text(json.dumps({"reports": rows, "failures": failures}, indent=2) + "\n")
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
