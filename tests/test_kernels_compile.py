"""Every kernel compiles for an H100 (sm_90) — checked on a CPU-only machine.

The interpreter runs kernels as numpy and accepts code the real compiler rejects (and the other way
round), so CI also pushes each kernel, in its widest constexpr configuration, through Triton's CUDA
pipeline (frontend, TTIR/TTGIR passes, LLVM, PTX, ptxas) without a GPU. It runs in a subprocess:
the test session has TRITON_INTERPRET=1 set, which would turn the kernels into interpreter objects.
"""
import os
import subprocess
import sys

import pytest

SIGNATURES = {
    ("guidance_head", "_head_phase1_kernel"): (
        "z_ptr:*bf16 w_ptr:*fp32 b_ptr:*fp32 lq_ptr:*fp32 labels_ptr:*i64 logits_ptr:*fp32 stats_ptr:*fp32 "
        "gram_ptr:*fp32 B:i32 C:i32 D:i32 num_class_tiles:i32 inv_tau:fp32",
        dict(BLOCK_B=32, BLOCK_C=64, BLOCK_D=64, NEED_CTX=True, NEED_DIV=True, PRECISION="ieee"),
    ),
    ("guidance_head", "_head_rows_kernel"): (
        "logits_ptr:*fp32 labels_ptr:*i64 groups_ptr:*i64 stats_ptr:*fp32 gram_ptr:*fp32 objective_ptr:*fp32 "
        "B:i32 C:i32 beta:fp32 gamma:fp32 inv_tau:fp32 norm_eps:fp32",
        dict(BLOCK_B=32, BLOCK_C=64, NEED_CTX=True, NEED_DIV=True),
    ),
    ("guidance_head", "_head_grad_kernel"): (
        "z_ptr:*fp32 w_ptr:*fp32 lq_ptr:*fp32 labels_ptr:*i32 groups_ptr:*i64 logits_ptr:*fp32 stats_ptr:*fp32 "
        "gram_ptr:*fp32 grad_ptr:*fp32 B:i32 C:i32 D:i32 beta:fp32 gamma:fp32 inv_tau:fp32 norm_eps:fp32",
        dict(BLOCK_B=16, BLOCK_C=16, BLOCK_D=64, NEED_CTX=True, NEED_DIV=True, PRECISION="tf32"),
    ),
    ("philox", "_philox_normal_kernel"): (
        "out_ptr:*fp32 seeds_ptr:*i64 stream:i32 numel:i32",
        dict(BLOCK=1024),
    ),
    # Integer arguments equal to 1 may be specialised into constants by the JIT: step 1's stream.
    ("philox", "_philox_normal_kernel", "stream=1"): (
        "out_ptr:*fp32 seeds_ptr:*i64 numel:i32",
        dict(stream=1, BLOCK=1024),
    ),
    ("ddpm_update", "_predict_x0_kernel"): (
        "x_ptr:*fp32 model_ptr:*fp32 out_ptr:*fp32 step_ptr:*i64 sra_ptr:*fp32 srm1_ptr:*fp32 numel:i32 "
        "model_row_stride:i32",
        dict(CLIP=True, BLOCK=1024),
    ),
    ("ddpm_update", "_ddpm_update_kernel"): (
        "x_ptr:*fp32 model_ptr:*fp32 grad_ptr:*fp32 noise_ptr:*fp32 seeds_ptr:*i64 out_ptr:*fp32 step_ptr:*i64 "
        "sra_ptr:*fp32 srm1_ptr:*fp32 coef1_ptr:*fp32 coef2_ptr:*fp32 post_logvar_ptr:*fp32 log_betas_ptr:*fp32 "
        "fixed_logvar_ptr:*fp32 scale:fp32 numel:i32 model_row_stride:i32",
        dict(CLIP=True, LEARN_SIGMA=True, GUIDED=True, NOISE=2, BLOCK=1024),
    ),
    ("ddim_update", "_ddim_update_kernel"): (
        "x_ptr:*fp32 model_ptr:*fp32 grad_ptr:*fp32 noise_ptr:*fp32 seeds_ptr:*i64 out_ptr:*fp32 step_ptr:*i64 "
        "sra_ptr:*fp32 srm1_ptr:*fp32 sqrt_abar_prev_ptr:*fp32 sqrt_one_minus_abar_ptr:*fp32 sigma_ptr:*fp32 "
        "direction_ptr:*fp32 scale:fp32 numel:i32 model_row_stride:i32",
        dict(CLIP=True, GUIDED=True, NOISE=2, BLOCK=1024),
    ),
    ("preprocess", "_preprocess_fwd_kernel"): (
        "x_ptr:*bf16 mean_ptr:*fp32 std_ptr:*fp32 y_ptr:*bf16 C:i32 H:i32 W:i32 OH:i32 OW:i32 scale_h:fp32 scale_w:fp32",
        dict(BLOCK=1024),
    ),
    ("preprocess", "_preprocess_bwd_kernel"): (
        "gy_ptr:*fp32 std_ptr:*fp32 gx_ptr:*fp32 C:i32 H:i32 W:i32 OH:i32 OW:i32 scale_h:fp32 scale_w:fp32",
        dict(WINDOW_H=5, WINDOW_W=5, BLOCK=512),
    ),
}


def compile_all() -> None:
    """Subprocess body: compile every entry of SIGNATURES for sm_90 and print one line each."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    print("triton", triton.__version__)
    target = GPUTarget("cuda", 90, 32)
    for key, (signature, constexprs) in SIGNATURES.items():
        module_name, kernel_name = key[:2]  # an optional third item names a variant
        module = importlib.import_module(f"igds_fast.kernels.{module_name}")
        kernel = getattr(module, kernel_name)
        types = dict(item.split(":") for item in signature.split())
        types.update({name: "constexpr" for name in constexprs})
        compiled = triton.compile(ASTSource(fn=kernel, signature=types, constexprs=constexprs), target=target)
        assert "ptx" in compiled.asm and compiled.asm["ptx"], kernel_name
        print("compiled", *key[1:])


def _nvidia_backend_available() -> bool:
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no CUDA pipeline to test
        return False
    return True


# The GPU machines this project measures on carry an older Triton than CI installs (see
# /work/.library/device: torch 2.11 with triton 3.6.0). .ci/run installs that Triton with
# `pip install --no-deps --target DIR triton==3.6.0` and names DIR here, so a kernel using a newer
# language feature fails in CI instead of on scarce GPU time (tl.to_tensor did, once).
DEVICE_TRITON_PATH = os.environ.get("IGDS_TEST_DEVICE_TRITON_PATH")
DEVICE_TRITON_VERSION = "3.6.0"


@pytest.mark.parametrize("triton_build", ["installed", f"device-{DEVICE_TRITON_VERSION}"])
def test_kernels_compile_for_sm90(triton_build):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_build == "installed":
        if not _nvidia_backend_available():
            pytest.skip("triton's CUDA backend is not installed")
    else:
        if not DEVICE_TRITON_PATH:
            pytest.skip("IGDS_TEST_DEVICE_TRITON_PATH is not set (.ci/run sets it)")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [DEVICE_TRITON_PATH, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    lines = result.stdout.splitlines()
    if triton_build != "installed":
        assert lines[0] == f"triton {DEVICE_TRITON_VERSION}", lines[:1]  # really the device's Triton
    assert sum(line.startswith("compiled ") for line in lines) == len(SIGNATURES)


if __name__ == "__main__":
    compile_all()
