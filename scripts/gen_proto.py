"""Regenerate the Python modules and typed stubs for proto/ (the one way to do it).

Usage: python scripts/gen_proto.py [--check]

Writes sdk/collateral_sync/v1/*_pb2.py, *_pb2_grpc.py and their .pyi stubs
(mypy-protobuf). With --check it generates into a temporary folder and exits 1
when the committed files differ, so stale generated code fails `make test`.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT / "sdk"
GEN_PACKAGE = Path("collateral_sync") / "v1"
INIT_TEXT = '"""Generated protobuf and gRPC modules for collateral_sync.v1 (do not edit)."""\n'


def _generate(out_root: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / GEN_PACKAGE).glob("*.proto"))
    bindir = Path(sys.executable).parent
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    done = subprocess.run(cmd, cwd=PROTO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"protoc failed with exit code {done.returncode}")
    (out_root / GEN_PACKAGE / "__init__.py").write_text(INIT_TEXT)


def _generated_files(root: Path) -> set[str]:
    pkg = root / GEN_PACKAGE
    if not pkg.is_dir():
        return set()
    return {p.name for p in pkg.iterdir() if p.is_file() and p.suffix in {".py", ".pyi"}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args()

    if not args.check:
        target = OUT_ROOT / GEN_PACKAGE
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        _generate(OUT_ROOT)
        print(f"generated {len(_generated_files(OUT_ROOT))} files in {target.relative_to(ROOT)}")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = Path(tmp)
        (tmp_root / GEN_PACKAGE).mkdir(parents=True)
        _generate(tmp_root)
        fresh = _generated_files(tmp_root)
        committed = _generated_files(OUT_ROOT)
        stale = sorted(fresh ^ committed)
        stale += sorted(
            name
            for name in fresh & committed
            if not filecmp.cmp(tmp_root / GEN_PACKAGE / name, OUT_ROOT / GEN_PACKAGE / name, shallow=False)
        )
    if stale:
        print("generated code is stale; run `make gen` and commit:", *stale, sep="\n  ", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
