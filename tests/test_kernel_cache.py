"""Numba's on-disk cache of llmrun's kernels (runtime.use_kernel_sources_stamp, setup.py): keyed by all the
kernel sources, so that a change to a helper another file's kernels inline recompiles them, and valid after the
files are copied (an installed wheel), so that a wheel built on this machine starts without compiling."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# In a fresh process on a copy of the package: is ops.swiglu (one cheap compile) in the cache?
_PROBE = r"""
import sys
from llmrun.kernels import ops, warmup
from numba import types
f32_2 = types.Array(types.float32, 2, "C")
sig = (f32_2, types.int64, f32_2)
cached = warmup.is_cached(ops.swiglu, sig)
if sys.argv[1] == "compile":
    ops.swiglu.compile(sig)
print("cached" if cached else "missing")
"""


def _copy_package(dst: Path) -> Path:
    shutil.copytree(REPO_ROOT / "llmrun", dst / "llmrun", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _probe(site: Path, action: str, cache_dir: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["PYTHONPATH"] = str(site)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    r = subprocess.run([sys.executable, "-c", _PROBE, action], capture_output=True, text=True, env=env,
                       cwd=site, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("where", ["in-tree", "NUMBA_CACHE_DIR"])
def test_a_change_to_any_kernel_source_recompiles_every_kernel(tmp_path, where):
    site = _copy_package(tmp_path / "site")
    cache = tmp_path / "numba" if where == "NUMBA_CACHE_DIR" else None
    assert _probe(site, "compile", cache) == "missing"
    assert _probe(site, "check", cache) == "cached"
    # a file the kernel is not defined in, but which kernels of other files inline (numba's own stamp is the
    # hash of the defining file only, which left stale machine code in use)
    with open(site / "llmrun" / "kernels" / "blocks.py", "a") as f:
        f.write("\n# changed\n")
    assert _probe(site, "check", cache) == "missing"
    assert _probe(site, "compile", cache) == "missing"
    # the rest of the package is not what kernels are built from: changing it keeps the cache
    with open(site / "llmrun" / "api.py", "a") as f:
        f.write("\n# changed\n")
    assert _probe(site, "check", cache) == "cached"


def test_other_packages_keep_numbas_own_cache_locator():
    import numba
    import llmrun.kernels  # noqa: F401  (installs llmrun's locators)
    from llmrun.kernels import gemv

    def plain(x):
        return x + 1

    ours = type(gemv._gemv._cache._impl.locator).__name__
    theirs = type(numba.njit(cache=True)(plain)._cache._impl.locator).__name__
    assert ours.startswith("Llmrun") and not theirs.startswith("Llmrun")


def test_a_wheel_built_here_carries_its_compiled_kernels(tmp_path):
    """setup.py compiles every kernel of this host into the wheel; installed (files copied, new times), the
    kernels are found in the cache: the first run compiles nothing."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if name.startswith(("models/", "tests/", "bench/", "docs/")) or not (REPO_ROOT / name).is_file():
            continue
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("llmrun-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        assert any(n.startswith("llmrun/kernels/__pycache__/") and n.endswith(".nbi") for n in z.namelist())
        z.extractall(site)   # (zipfile sets new modification times, as pip does)
    probe = ("from llmrun.kernels import warmup; import sys; "
             "sys.exit(1 if warmup.missing(warmup.host_units()) else 0)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=site, timeout=300,
                       env={**env, "PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr
