"""Builds frozenopt._C, the compiled ops.

csrc/cpu/kernels.cpp is compiled once per CPU capability (DEFAULT, AVX2,
AVX512), each with the defines and -m flags that make at::vec vectorise, and
the objects are linked into the extension; csrc/cpu/ops_cpu.cpp picks one at
run time.

The extension only works with the torch it was compiled against, so it is
built against the torch already installed: `pip install --no-build-isolation .`.
torch is deliberately not a build requirement: an isolated build cannot see the
user's torch and stops here with that instruction instead of compiling against
another one. The torch version used is written beside the module
(frozenopt/_build_info.py) and checked when frozenopt is imported.

CUDA: when torch is a CUDA build and a CUDA toolkit is found (CUDA_HOME or
nvcc on PATH), csrc/cuda/ is compiled too, whether or not a GPU is visible.
FORCE_CUDA=1 insists (an error if it cannot), USE_CUDA=0 skips it. When
TORCH_CUDA_ARCH_LIST is unset it defaults to 7.0;7.5;8.0;8.6;8.9;9.0+PTX
(without 7.0 on CUDA >= 13, which dropped Volta); a value the user set is
never changed. With CUDA >= 12.1 and every architecture sm_70 or newer the
kernels are compiled for 32 KB of launch metadata as well as 4 KB, and each
launch uses 32 KB where the driver (CUDA >= 12.1) and the device allow it, at
run time; otherwise for 4 KB only (FROZENOPT_SMALL_KERNEL_ARGS).
"""

import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import setuptools
from setuptools import setup

INSTALL = 'pip install "setuptools>=77" wheel pybind11 ninja && pip install --no-build-isolation .'
MIN_TORCH = (2, 4)

try:
    import torch
except ImportError:
    raise SystemExit(
        "frozenopt: no torch to compile against here (an isolated build cannot see the torch you have). "
        f"Install torch first, then: {INSTALL}"
    ) from None
if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < MIN_TORCH:
    raise SystemExit(f"frozenopt needs torch >= {'.'.join(map(str, MIN_TORCH))}; this environment has "
                     f"torch {torch.__version__}")
if int(setuptools.__version__.split(".")[0]) < 77:
    raise SystemExit(f"frozenopt needs setuptools >= 77 to build (found {setuptools.__version__}): {INSTALL}")

from torch.utils.cpp_extension import BuildExtension, CppExtension  # noqa: E402

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

# at::parallel_for only runs in parallel in code compiled with OpenMP on (its
# OpenMP body is a header inline); without it the one parallel region of a
# step runs on one thread. The module then needs libgomp, which torch has loaded.
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []
CXX_FLAGS = ["-O3", "-std=c++20", "-fPIC"] + OPENMP_FLAGS


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
        for ext in self.extensions:
            self._write_record(Path(self.get_ext_fullpath(ext.name)).parent)

    def copy_extensions_to_source(self):
        """An in-place (editable) build copies the module into the source tree: the record goes with it."""
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            self._write_record(Path(build_py.get_package_dir(ext.name.rpartition(".")[0])))

    @staticmethod
    def _write_record(package_dir):
        (package_dir / "_build_info.py").write_text(
            "# Written by setup.py when frozenopt._C was compiled; checked at import.\n"
            f"TORCH_VERSION = {torch.__version__!r}\n")

    def _compile_kernels(self, ext):
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


DEFAULT_CUDA_ARCHS = ["7.0", "7.5", "8.0", "8.6", "8.9", "9.0+PTX"]


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_build():
    """(build the CUDA sources?, why not) from torch, the toolkit and FORCE_CUDA/USE_CUDA."""
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("USE_CUDA", "").strip() in ("0", "false", "no", "off"):
        if _flag("FORCE_CUDA"):
            raise SystemExit("FORCE_CUDA=1 and USE_CUDA=0 contradict each other")
        return False, "USE_CUDA=0"
    why = None
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is not a CUDA build"
    elif CUDA_HOME is None:
        why = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    if why and _flag("FORCE_CUDA"):
        raise SystemExit(f"FORCE_CUDA=1 but {why}")
    return why is None, why


def _nvcc_version():
    import re
    import subprocess

    from torch.utils.cpp_extension import CUDA_HOME

    out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _cuda_arch_flags(nvcc):
    """Sets TORCH_CUDA_ARCH_LIST when the user has not; returns the extra defines it implies."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not archs:
        default = [a for a in DEFAULT_CUDA_ARCHS if not (nvcc >= (13, 0) and a.startswith("7.0"))]
        archs = ";".join(default)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        print(f"frozenopt: TORCH_CUDA_ARCH_LIST unset, building for {archs}", file=sys.stderr)
    numbers = []
    for arch in archs.replace(",", ";").replace(" ", ";").split(";"):
        arch = arch.split("+")[0].strip()
        if arch:
            try:
                numbers.append(float(arch.rstrip("a").rstrip("f")))
            except ValueError:
                pass  # names like "Ampere": torch resolves them; assume modern
    large_args = nvcc >= (12, 1) and all(n >= 7.0 for n in numbers)
    return [] if large_args else ["-DFROZENOPT_SMALL_KERNEL_ARGS"]


def _extension():
    from torch.utils.cpp_extension import include_paths

    # Every build: the schemas, the module, the checks, the step plan, the
    # watch, the CPU ops and the launch planner's bindings (host-only code).
    cpu_sources = [CSRC / "schemas.cpp", CSRC / "module.cpp", CSRC / "checks.cpp", CSRC / "step_plan.cpp",
                   CSRC / "watch.cpp", CSRC / "cpu" / "ops_cpu.cpp", CSRC / "multi_tensor" / "plan_py.cpp"]
    with_cuda, why_not = _cuda_build()
    if not with_cuda:
        if why_not and why_not != "USE_CUDA=0":
            print(f"frozenopt: building the CPU ops only ({why_not})", file=sys.stderr)
        return CppExtension(
            name="frozenopt._C",
            sources=[str(p.relative_to(ROOT)) for p in cpu_sources],
            include_dirs=include_paths() + [str(CSRC)],
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=OPENMP_FLAGS,
        )

    from torch.utils.cpp_extension import CUDAExtension

    defines = ["-DFROZENOPT_WITH_CUDA"] + _cuda_arch_flags(_nvcc_version())
    # CUDA builds only: the ops' CUDA bodies and the kernels (nvcc).
    cuda = CSRC / "cuda"
    sources = cpu_sources + [cuda / "ops_cuda.cpp", cuda / "launch_sgd.cu", cuda / "launch_adam.cu"]
    return CUDAExtension(
        name="frozenopt._C",
        sources=[str(p.relative_to(ROOT)) for p in sources],
        include_dirs=[str(CSRC)],
        extra_compile_args={
            "cxx": CXX_FLAGS + defines,
            "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"] + defines,
        },
        extra_link_args=OPENMP_FLAGS,
    )


if sys.platform == "win32":
    raise SystemExit("frozenopt builds on Linux and macOS only")

setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildWithCapabilities},
)
