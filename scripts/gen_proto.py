"""Regenerate the code generated from proto/ (the one way to do it).

Usage: python scripts/gen_proto.py [--check]

Writes the Python SDK's sdk/collateral_sync/v1/*_pb2.py, *_pb2_grpc.py and their
.pyi stubs (grpcio-tools, mypy-protobuf), and the TypeScript SDK's
sdk/typescript/src/gen/ (buf generate with buf.gen.yaml: protoc-gen-es from
sdk/typescript/node_modules). With --check it generates into a temporary folder
and exits 1 when the committed files differ, so stale generated code fails
`make test`.
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
TS_GEN = Path("sdk") / "typescript" / "src" / "gen"
BUF = ROOT / "node_modules" / ".bin" / "buf"
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


def _generate_typescript(out_root: Path) -> None:
    """buf generate with buf.gen.yaml, its outputs under ``out_root`` (the repository or a temp dir)."""
    plugin = ROOT / "sdk" / "typescript" / "node_modules" / ".bin" / "protoc-gen-es"
    for tool in (BUF, plugin):
        if not tool.exists():
            raise SystemExit(f"{tool.relative_to(ROOT)} is missing: run `make setup` first")
    cmd = [str(BUF), "generate", "--template", "buf.gen.yaml", "-o", str(out_root)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"buf generate failed with exit code {done.returncode}")


def _generated_files(root: Path) -> set[str]:
    """Generated files under ``root``, as paths relative to it."""
    found: set[str] = set()
    pkg = root / GEN_PACKAGE
    if pkg.is_dir():
        found |= {
            str(p.relative_to(root)) for p in pkg.iterdir() if p.is_file() and p.suffix in {".py", ".pyi"}
        }
    ts = root / TS_GEN
    if ts.is_dir():
        found |= {str(p.relative_to(root)) for p in ts.rglob("*.ts")}
    return found


def _where(root: Path, name: str) -> Path:
    """Where generated file ``name`` lives under ``root`` (Python's are relative to sdk/)."""
    return root / "sdk" / name if name.startswith(str(GEN_PACKAGE)) else root / name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args()

    if not args.check:
        for target in (OUT_ROOT / GEN_PACKAGE, ROOT / TS_GEN):
            if target.exists():
                shutil.rmtree(target)
        (OUT_ROOT / GEN_PACKAGE).mkdir(parents=True)
        _generate(OUT_ROOT)
        _generate_typescript(ROOT)
        count = len(_generated_files(OUT_ROOT)) + len(_generated_files(ROOT))
        print(f"generated {count} files in sdk/{GEN_PACKAGE} and {TS_GEN}")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = Path(tmp)
        (tmp_root / "sdk" / GEN_PACKAGE).mkdir(parents=True)
        _generate(tmp_root / "sdk")
        _generate_typescript(tmp_root)
        fresh = _generated_files(tmp_root / "sdk") | _generated_files(tmp_root)
        committed = _generated_files(OUT_ROOT) | _generated_files(ROOT)
        stale = sorted(fresh ^ committed)
        stale += sorted(
            name
            for name in fresh & committed
            if not filecmp.cmp(_where(tmp_root, name), _where(ROOT, name), shallow=False)
        )
    if stale:
        print("generated code is stale; run `make gen` and commit:", *stale, sep="\n  ", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
