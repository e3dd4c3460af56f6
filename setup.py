"""Build hook: a wheel built on this machine carries its kernels compiled (pyproject.toml holds the metadata).

`pip install .` builds a wheel and installs it; without this, the first run after it compiled ~25 s of CPU
before the first token (llmrun/kernels/warmup.py). Here, after the sources are copied into the build tree,
`python -m llmrun.kernels.warmup --all` compiles every kernel of this host into numba's cache beside them
(`__pycache__`), which goes into the wheel. Numba keys that cache by CPU and by a digest of the kernel sources'
contents (llmrun/runtime.py), so an installed copy uses it as is, and on another CPU (a wheel copied to another
machine) it is simply not used: the kernels are then compiled at the first run, as without it.

Editable installs (`make install`) skip this: the Makefile compiles into the source tree after installing.
LLMRUN_PRECOMPILE=0 skips it too. A failure to compile is reported and the wheel is built without the cache.
"""
from __future__ import annotations

import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or os.environ.get("LLMRUN_PRECOMPILE", "1") == "0":
            return
        env = dict(os.environ)
        # the build tree first; pip's isolated build environment reaches the child through PYTHONPATH too
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(self.build_lib)] +
                                            ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.pop("NUMBA_CACHE_DIR", None)     # into the build tree, not a cache of the user's
        result = subprocess.run([sys.executable, "-m", "llmrun.kernels.warmup", "--all"], env=env,
                                cwd=self.build_lib)
        if result.returncode != 0:
            print("llmrun: compiling the kernels at build time failed; they will be compiled at the first run",
                  file=sys.stderr)


setup(cmdclass={"build_py": BuildPyWithKernels})
