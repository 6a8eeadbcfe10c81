"""Builds cuflash_attn._C with torch.utils.cpp_extension (ninja, parallel jobs).

Build knobs (environment variables):
  CUFLASH_CUDA_ARCHS   semicolon/comma list of targets, default "8.0;9.0a"
                       (9.0a is sm_90a, which the Hopper instructions need)
  CUFLASH_HEAD_DIMS    compile only these head-dim buckets, e.g. "64,128" (default: all)
  MAX_JOBS             parallel compile jobs (default: every core)
  CUFLASH_CPU_SANITIZE "1": the C++ files under AddressSanitizer and UndefinedBehaviorSanitizer
                       (scripts/cpu_sanitize.sh builds such a copy and runs the CPU tests on it)
"""
import os
import re
import sys
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def gencode_flags(archs):
    """nvcc's -gencode flags, and CUFLASH_SM90A_BUILT when sm_90a is among them (the host code
    then dispatches to the Hopper kernels, which only an sm_90a cubin holds)."""
    flags = []
    nums = [arch.replace(".", "") for arch in re.split(r"[;, ]+", archs.strip()) if arch]
    # PTX of the newest portable target besides its cubin, so that a GPU newer than every target
    # (whose compute capability picks the sm_80-class kernels) JIT-compiles them instead of failing
    # with "no kernel image"; an arch-specific target's ("a") PTX runs on its own GPU only.
    portable = [num for num in nums if not num.endswith("a")]
    with_ptx = max(portable, key=int) if portable else None
    for num in nums:
        code = f"[sm_{num},compute_{num}]" if num == with_ptx else f"sm_{num}"
        flags.append(f"-gencode=arch=compute_{num},code={code}")
        if num == "90a":
            flags.append("-DCUFLASH_SM90A_BUILT")
    return flags


def kernel_sources():
    """The generated instantiations, filtered by CUFLASH_HEAD_DIMS, and the defines that tell
    the generated dispatch which buckets exist."""
    files = sorted((CSRC / "cuda" / "instantiations").glob("*.cu"))
    wanted = os.environ.get("CUFLASH_HEAD_DIMS", "").strip()
    if not wanted:
        return files, []
    dims = sorted({int(d) for d in re.split(r"[;, ]+", wanted) if d})
    keep = [f for f in files if (m := re.search(r"_hdim(\d+)_", f.name)) is None or int(m.group(1)) in dims]
    return keep, ["-DCUFLASH_HEAD_DIMS_FILTER"] + [f"-DCUFLASH_BUILD_HDIM_{d}" for d in dims]


# The torch the extension is built against, for the loader's message when another one imports it
# (cuflash_attn/_load.py); pyproject.toml pins the same minor version.
SUPPORTED_TORCH = "2.11"


def check_and_record_torch():
    if not torch.__version__.startswith(SUPPORTED_TORCH + "."):
        sys.exit(f"cuflash_attn builds against torch {SUPPORTED_TORCH} (CUDA 13.0), found torch {torch.__version__}: "
                 f"install torch=={SUPPORTED_TORCH}.0 (bash scripts/setup.sh does), then build with "
                 f"`pip install --no-build-isolation .`")
    build_info = ROOT / "cuflash_attn" / "_build_info.py"
    text = f'"""Written by setup.py."""\nTORCH_VERSION = "{torch.__version__}"\n'
    if not build_info.is_file() or build_info.read_text() != text:  # unchanged: no rebuild of the package
        build_info.write_text(text)


os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
# CUFLASH_PTXAS_VERBOSE=1: ptxas's report of every kernel in the build log (registers, spills,
# and a note for each wgmma it had to serialize, which scripts/setup.sh refuses).
ptxas_flags = ["-Xptxas=-v"] if os.environ.get("CUFLASH_PTXAS_VERBOSE") == "1" else []
cu_files, defines = kernel_sources()
sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"] \
    if os.environ.get("CUFLASH_CPU_SANITIZE") == "1" else []
sources = [str(p.relative_to(ROOT)) for p in
           [CSRC / "torch_ops.cpp", CSRC / "cpu" / "flash_cpu.cpp", CSRC / "cuda" / "dropout_mask.cu",
            CSRC / "cuda" / "packed_gaps.cu", CSRC / "cuda" / "backward_choice.cu",
            CSRC / "cuda" / "forward_choice.cu", CSRC / "cuda" / "fp32_pairs.cu", *cu_files]]


def main():
    check_and_record_torch()
    setup(
        packages=find_packages(include=["cuflash_attn", "cuflash_attn.*"]),
        ext_modules=[
            CUDAExtension(
                "cuflash_attn._C",
                sources,
                # -fopenmp: at::parallel_for splits the CPU kernels' work over torch's threads only in
                # code compiled with OpenMP (else it runs the whole range on the calling thread);
                # the library is torch's own libgomp, loaded by `import torch` under the same soname.
                extra_compile_args={
                    "cxx": ["-O3", "-std=c++17", "-fopenmp", *sanitize, *defines],
                    "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", *defines, *ptxas_flags,
                             *gencode_flags(os.environ.get("CUFLASH_CUDA_ARCHS", "8.0;9.0a"))],
                },
                extra_link_args=["-fopenmp", *sanitize[:1]],
                py_limited_api=False,
            )
        ],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


# Run as a script (python setup.py, pip); imported, only the helpers above (tests/test_packaging.py).
if __name__ == "__main__":
    main()
