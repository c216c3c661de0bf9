"""How cnm's BPF programs become object files: the clang command, its include paths, and
where the objects go (ebpf/<name>.bpf.o, shipped as package data).

Standard library only: setup.py loads this file by path at build time (before cnm is
installed), and tests use it to compile their own programs with the same flags.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC_DIR = HERE / "src"
INCLUDE_DIR = HERE / "include"
OBJ_DIR = HERE  # the objects sit next to the modules: ebpf/<name>.bpf.o
CFLAGS = ("-O2", "-g", "-target", "bpf", "-Wall", "-Werror")


class BuildError(RuntimeError):
    """clang is missing or refused a program (the message holds its output)."""


def find_clang() -> str | None:
    return shutil.which(os.environ.get("CNM_CLANG", "clang"))


def _arch_include_dirs() -> list[str]:
    """The multiarch uapi directory (Debian keeps asm/types.h in /usr/include/<triple>):
    `-target bpf` does not add it on its own."""
    found = sorted(glob.glob("/usr/include/*-linux-gnu*/asm/types.h"))
    machine = os.uname().machine
    own = [p for p in found if f"/{machine}-" in p]
    return [str(Path(p).parent.parent) for p in (own or found)[:1]]


def sources() -> list[Path]:
    return sorted(SRC_DIR.glob("*.bpf.c"))


def object_for(source: Path, out_dir: Path = OBJ_DIR) -> Path:
    return out_dir / source.name.replace(".bpf.c", ".bpf.o")


def compile_program(
    source: Path, output: Path, *, clang: str | None = None, extra: tuple[str, ...] = ()
) -> Path:
    """Compile one .bpf.c into a BPF object; BuildError with clang's output on failure."""
    clang = clang or find_clang()
    if clang is None:
        raise BuildError("clang not found: BPF objects cannot be built")
    output.parent.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{INCLUDE_DIR}", *(f"-idirafter{d}" for d in _arch_include_dirs())]
    tmp = output.with_suffix(output.suffix + ".tmp")
    argv = [clang, *CFLAGS, *includes, *extra, "-c", str(source), "-o", str(tmp)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"{source.name}: clang failed:\n{proc.stderr.strip()}")
    os.replace(tmp, output)
    return output


def _stale(source: Path, output: Path) -> bool:
    if not output.exists():
        return True
    newest = max([source.stat().st_mtime, *(h.stat().st_mtime for h in INCLUDE_DIR.glob("*.h"))])
    return output.stat().st_mtime < newest


def build_all(out_dir: Path = OBJ_DIR, *, force: bool = False) -> list[Path]:
    """Build every program whose object is missing or older than its sources."""
    clang = find_clang()
    if clang is None:
        raise BuildError("clang not found: BPF objects cannot be built")
    built = []
    for source in sources():
        output = object_for(source, out_dir)
        if force or _stale(source, output):
            compile_program(source, output, clang=clang)
        built.append(output)
    return built


if __name__ == "__main__":  # `python ebpf/build.py`: build now, clang's errors on stderr
    import sys

    try:
        for path in build_all():
            print(path)
    except BuildError as exc:
        print(f"BPF objects not built: {exc}", file=sys.stderr)
        sys.exit(1)
