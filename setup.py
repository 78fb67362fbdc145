"""The one compiled module, the DOM walk's per-node loop (m3w/pipeline/html_walk.pyx); pyproject.toml holds the rest.

`pip install` (and so `make setup`) fails when it cannot be built: it needs a C compiler and Python's headers.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("m3w.pipeline.html_walk", ["m3w/pipeline/html_walk.pyx"])])
