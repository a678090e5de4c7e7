"""Every kernel configuration the engine can launch compiles for sm_90 and sm_80 (no GPU needed) within shared
memory and without register spills; and the harness itself notices overflow and spills (toy kernels)."""

from __future__ import annotations

import json

import pytest
import triton
import triton.language as tl

from minicpmv.engine.kernels import aot
from minicpmv.engine.kernels.aot import SHARED_MEMORY_LIMIT, compile_spec
from minicpmv.engine.kernels.spec import LaunchSpec

ARCHS = (90, 80)

# Collected at import. If that fails (paged_attention missing or broken) the kernel cases below ERROR with the
# original exception rather than vanish from the run; the harness self-tests still run.
try:
    from minicpmv.engine.kernels import launch_configs

    CONFIGS, CONFIGS_ERROR = launch_configs(), None
except Exception as e:  # re-raised by the fixture below
    CONFIGS, CONFIGS_ERROR = [], e


@pytest.fixture
def configs_importable():
    if CONFIGS_ERROR is not None:
        raise CONFIGS_ERROR


@pytest.mark.parametrize(
    "spec, arch",
    [(spec, arch) for spec in CONFIGS for arch in ARCHS if arch in spec.archs] or [(None, 90)],
    ids=lambda v: v.name if isinstance(v, LaunchSpec) else str(v) if v else "launch_configs()",
)
def test_launch_config_compiles_within_resources(configs_importable, spec, arch):
    report = compile_spec(spec, arch)
    assert report.problems() == [], (
        f"{spec.name} (num_warps={spec.num_warps}, num_stages={spec.num_stages}, {spec.constexprs}) is unfit for"
        f" sm_{arch}: " + "; ".join(report.problems())
    )


# -- harness self-tests, on toy kernels --------------------------------------------------------------------------


@triton.jit
def _scale(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2, mask=mask)


@triton.jit
def _matmul(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc.to(c_ptr.dtype.element_ty))


@triton.jit
def _softmax_scaled(x_ptr, w_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    w = tl.load(w_ptr + offs)
    x = tl.exp(x - tl.max(x, 0))
    tl.store(y_ptr + offs, x * w / tl.sum(x, 0))


SMALL = LaunchSpec(
    "toy-scale", _scale, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}, {"BLOCK": 1024}, 4, 2, ("x_ptr", "y_ptr")
)
# fp32 128x64 + 64x128 tiles are 64 KiB a stage; 4 stages on sm_90 (256 KiB), 3 on sm_80 (192 KiB): over both
# limits, at ~200 registers and no spills.
SHARED_HOG = LaunchSpec(
    "toy-shared-hog",
    _matmul,
    {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32", "K": "i32"},
    {"BM": 128, "BN": 128, "BK": 64},
    8,
    4,
)
# One warp holding two 8192-wide fp32 rows across reductions: 512 live values a thread > 255 registers.
SPILLER = LaunchSpec(
    "toy-spiller", _softmax_scaled, {"x_ptr": "*fp32", "w_ptr": "*fp32", "y_ptr": "*fp32"}, {"BLOCK": 8192}, 1, 1
)


@pytest.mark.parametrize("arch, target", [(90, "sm_90a"), (80, "sm_80")])
def test_small_kernel_is_fit(arch, target):
    report = compile_spec(SMALL, arch)
    assert report.problems() == []
    assert (report.spill_stores, report.spill_loads) == (0, 0)
    assert 0 < report.registers <= 255 and report.shared_bytes <= SHARED_MEMORY_LIMIT[arch]
    assert report.ptx_target == target and report.cubin_bytes > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_memory_overflow_is_a_problem(arch):
    # Triton does not raise for this at compile time (only at launch, on a device): it must show as a problem.
    report = compile_spec(SHARED_HOG, arch)
    assert report.shared_bytes > SHARED_MEMORY_LIMIT[arch]
    assert report.problems() == [
        f"toy-shared-hog on sm_{arch}: shared memory {report.shared_bytes} B exceeds the"
        f" {SHARED_MEMORY_LIMIT[arch]} B per-block limit"
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_register_spills_are_a_problem(arch):
    report = compile_spec(SPILLER, arch)
    assert report.spill_stores > 0 and report.spill_loads > 0
    assert [p for p in report.problems() if "register spills" in p] == report.problems() != []


@pytest.mark.parametrize("arch", ARCHS)
def test_divisible_by_16_reaches_the_compiler(arch):
    # fp16 loads are pipelined (cp.async, one buffer a stage) only when 16-byte aligned: with the hints the same
    # kernel allocates num_stages-ish buffers instead of one, as the JIT would with aligned tensors.
    fp16 = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "K": "i32"}
    tiles = {"BM": 128, "BN": 128, "BK": 64}
    plain = compile_spec(LaunchSpec("toy-mm", _matmul, fp16, tiles, 8, 4), arch)
    aligned = compile_spec(LaunchSpec("toy-mm", _matmul, fp16, tiles, 8, 4, ("a_ptr", "b_ptr", "K")), arch)
    assert aligned.shared_bytes >= 3 * plain.shared_bytes > 0


def test_missing_cubin_is_a_problem():
    report = aot.AotReport("toy", 90, 0, 32, 0, 0, 0.1, "sm_90a", cubin_bytes=0)
    assert report.problems() == ["toy on sm_90: no cubin"]


def test_spec_not_matching_the_kernel_is_rejected():
    with pytest.raises(ValueError, match="missing \\['n'\\]"):
        compile_spec(LaunchSpec("toy", _scale, {"x_ptr": "*fp32", "y_ptr": "*fp32"}, {"BLOCK": 16}, 4, 2), 90)


def test_main_prints_a_table_and_fails_on_problems(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("minicpmv.engine.kernels.launch_configs", lambda: [SMALL])
    assert aot.main(["--arch", "90", "--json", str(tmp_path / "ok.json")]) == 0
    assert "toy-scale" in capsys.readouterr().out
    assert json.loads((tmp_path / "ok.json").read_text())["failures"] == []

    monkeypatch.setattr("minicpmv.engine.kernels.launch_configs", lambda: [SMALL, SPILLER])
    assert aot.main(["--arch", "80", "--json", str(tmp_path / "bad.json")]) == 1
    out = capsys.readouterr()
    assert "PROBLEM" in out.out and "toy-spiller on sm_80: register spills" in out.err
    reports = json.loads((tmp_path / "bad.json").read_text())["reports"]
    assert [r["name"] for r in reports] == ["toy-scale", "toy-spiller"]
