"""Builds frozenopt._C, the compiled ops.

csrc/cpu/kernels.cpp is compiled once per CPU capability (DEFAULT, AVX2,
AVX512), each with the defines and -m flags that make at::vec vectorise, and
the objects are linked into the extension; csrc/cpu/ops_cpu.cpp picks one at
run time. Build with `pip install --no-build-isolation .` against an installed
torch (build isolation would fetch a different torch from the registry).
"""

import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"

# name -> (defines, flags); x86-64 only; other machines build DEFAULT alone.
CPU_CAPABILITIES = {
    "DEFAULT": ([], []),
    "AVX2": (["CPU_CAPABILITY_AVX2"], ["-mavx2", "-mfma", "-mf16c"]),
    "AVX512": (
        ["CPU_CAPABILITY_AVX512"],
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    ),
}

CXX_FLAGS = ["-O3", "-std=c++20", "-fPIC"]


def _capabilities():
    if platform.machine().lower() in ("x86_64", "amd64"):
        return list(CPU_CAPABILITIES)
    return ["DEFAULT"]


class BuildWithCapabilities(BuildExtension):
    """Compiles the per-capability kernel objects, then the extension itself."""

    def build_extensions(self):
        for ext in self.extensions:
            ext.extra_objects = list(ext.extra_objects or []) + self._compile_kernels(ext)
        super().build_extensions()

    def _compile_kernels(self, ext):
        import torch

        source = str(CSRC / "cpu" / "kernels.cpp")
        out_root = Path(self.build_temp) / "kernels"
        abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"

        def compile_one(cap):
            defines, flags = CPU_CAPABILITIES[cap]
            macros = [("FROZENOPT_CAP", cap), ("CPU_CAPABILITY", cap)] + [(d, None) for d in defines]
            objects = self.compiler.compile(
                [source],
                output_dir=str(out_root / cap),
                macros=macros,
                include_dirs=ext.include_dirs,
                extra_postargs=CXX_FLAGS + [abi] + flags,
            )
            return objects[0]

        # The copies are independent: build them side by side.
        with ThreadPoolExecutor(max_workers=max(1, min(3, os.cpu_count() or 1))) as pool:
            return list(pool.map(compile_one, _capabilities()))


def _extension():
    from torch.utils.cpp_extension import include_paths

    sources = [str(p.relative_to(ROOT)) for p in [CSRC / "frozenopt.cpp", CSRC / "checks.cpp", CSRC / "cpu" / "ops_cpu.cpp"]]
    return CppExtension(
        name="frozenopt._C",
        sources=sources,
        include_dirs=include_paths() + [str(CSRC)],
        extra_compile_args={"cxx": CXX_FLAGS},
    )


if sys.platform == "win32":
    raise SystemExit("frozenopt builds on Linux and macOS only")

setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildWithCapabilities},
)
