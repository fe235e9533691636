"""The native ring core (shm/_native.c) is the one thing pyproject.toml cannot declare.

It is optional: where no C compiler or Python headers exist, the build says so and goes on, and
`multikernel.shm` falls back to the pure-Python ring with a one-line notice (shm/_core.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "multikernel.shm._native",
            sources=["shm/_native.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
