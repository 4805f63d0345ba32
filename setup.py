"""The one compiled piece: ckpttool's float casts (optional; the package works without it).

Everything else about the package is in pyproject.toml. ``optional=True``: where no C compiler
exists the build goes on without the extension, and the casts run on numpy's kernels instead.
"""

import os

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ckpttool.writers._fastcast",
            ["ckpttool/writers/_fastcast.c"],
            optional=True,
            # numpy-free: the C API and the buffer protocol only. -O3 vectorises the loops
            # (some Pythons build extensions with -O2, where GCC vectorises less).
            extra_compile_args=[] if os.name == "nt" else ["-O3"],
        )
    ]
)
