"""Make an installed lerobot >= 0.5 importable on Python 3.11 by rewriting its PEP 695 syntax (a 3.12 feature).

lerobot 0.6.1 declares Requires-Python >= 3.12 but uses only a handful of 3.12-only constructs:
`type X = Y` aliases, generic classes `class C[T](Base):` and a generic function `def f[T: B](...)`. This script
finds every lerobot module that does not compile on the running interpreter and rewrites exactly those lines:

    type X = Y                       ->  X = Y
    class C[T, U](Base):             ->  C's type variables declared above it; class C(Base, Generic[T, U]):
    def f[T: Bound](x: T) -> T:      ->  T declared above it (bound kept); def f(x: T) -> T:

Idempotent (files that compile are left alone). Exits non-zero, naming the file and line, when a module still does not
compile afterwards. Usage: `python scripts/patch_lerobot_py311.py [SITE_DIR]` (default: where `lerobot` is found).
"""
from __future__ import annotations

import importlib.util
import pathlib
import re
import sys

_TYPE_ALIAS = re.compile(r"^(\s*)type\s+([A-Za-z_]\w*)\s*=\s*(.*)$")
_GENERIC_CLASS = re.compile(r"^(\s*)class\s+([A-Za-z_]\w*)\[([^\]]+)\]\s*(?:\((.*)\))?\s*:(.*)$")
_GENERIC_DEF = re.compile(r"^(\s*)(async\s+def|def)\s+([A-Za-z_]\w*)\[([^\]]+)\]\((.*)$")


def _typevars(params: str, indent: str) -> tuple[list[str], list[str]]:
    """`T: Bound, U` -> (["T", "U"], TypeVar declaration lines)."""
    names, lines = [], []
    for part in params.split(","):
        name, _, bound = part.strip().partition(":")
        name = name.strip()
        names.append(name)
        bound_arg = f", bound={bound.strip()!r}" if bound.strip() else ""  # a string bound: resolved lazily
        lines.append(f"{indent}{name} = __import__('typing').TypeVar({name!r}{bound_arg})  # py3.11 patch\n")
    return names, lines


def _decorator_start(lines: list[str], i: int) -> int:
    while i > 0 and lines[i - 1].lstrip().startswith("@"):
        i -= 1
    return i


def rewrite(source: str) -> str:
    lines = source.splitlines(keepends=True)
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _TYPE_ALIAS.match(line)
        if m:
            out.append(f"{m.group(1)}{m.group(2)} = {m.group(3)}\n")
            i += 1
            continue
        m = _GENERIC_CLASS.match(line)
        if m:
            indent, name, params, bases, rest = m.groups()
            names, decls = _typevars(params, indent)
            generic = f"__import__('typing').Generic[{', '.join(names)}]"
            bases = f"{bases}, {generic}" if bases and bases.strip() else generic
            start = _decorator_start(out + [line], len(out))  # decorators already copied to `out`
            out[start:start] = decls
            out.append(f"{indent}class {name}({bases}):{rest}\n")
            i += 1
            continue
        m = _GENERIC_DEF.match(line)
        if m:
            indent, kw, name, params, rest = m.groups()
            _, decls = _typevars(params, indent)
            start = _decorator_start(out + [line], len(out))
            out[start:start] = decls
            out.append(f"{indent}{kw} {name}({rest}\n")
            i += 1
            continue
        out.append(line)
        i += 1
    return "".join(out)


def _compiles(path: pathlib.Path, text: str) -> SyntaxError | None:
    try:
        compile(text, str(path), "exec")
    except SyntaxError as exc:
        return exc
    return None


def patch_tree(root: pathlib.Path) -> list[pathlib.Path]:
    """Rewrite every module under `root` that does not compile; returns the patched files."""
    patched = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if _compiles(path, text) is None:
            continue
        new = rewrite(text)
        err = _compiles(path, new)
        if err is not None:
            raise SystemExit(f"patch_lerobot_py311: {path}:{err.lineno} still does not compile on Python "
                             f"{sys.version.split()[0]} after the PEP 695 rewrite ({err.msg}); use Python >= 3.12 "
                             "or extend scripts/patch_lerobot_py311.py")
        path.write_text(new, encoding="utf-8")
        for cache in path.parent.glob(f"__pycache__/{path.stem}.*.pyc"):
            cache.unlink()
        patched.append(path)
    return patched


def main(argv: list[str]) -> int:
    if argv:
        root = pathlib.Path(argv[0]) / "lerobot"
    else:
        spec = importlib.util.find_spec("lerobot")  # finds the package without importing its submodules
        if spec is None or not spec.submodule_search_locations:
            print("patch_lerobot_py311: lerobot is not installed; run scripts/install_lerobot.sh", file=sys.stderr)
            return 2
        root = pathlib.Path(list(spec.submodule_search_locations)[0])
    if not root.is_dir():
        print(f"patch_lerobot_py311: no lerobot package at {root}", file=sys.stderr)
        return 2
    patched = patch_tree(root)
    print(f"patch_lerobot_py311: {len(patched)} file(s) rewritten under {root}")
    for path in patched:
        print(f"  {path.relative_to(root.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
