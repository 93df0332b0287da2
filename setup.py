"""The one compiled part: the decoder's fused composite (runtime/composite.c), loaded with ctypes.

Optional: where no C compiler is found the install goes on without it, and the ONNX Runtime
backend runs the decoder's whole graph (runtime/composite.py says which one runs)."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    def build_extensions(self):
        # float32 operations in the graph's order, never contracted into fused multiply-adds
        # (clang contracts by default on arm64): the frames stay the ONNX graph's to the bit
        flags = (
            ["/O2", "/fp:strict"]
            if self.compiler.compiler_type == "msvc"
            else [
                "-O3",
                "-ffp-contract=off",
                "-fno-fast-math",
            ]
        )
        for ext in self.extensions:
            ext.extra_compile_args = flags
        super().build_extensions()


setup(
    ext_modules=[Extension("edgetalk.runtime._composite", ["runtime/composite.c"], optional=True)],
    cmdclass={"build_ext": BuildExt},
)
