"""Repack a downloaded, checksummed wheel with minimal, counted patches (used by install_lava.sh / install_lava_dl.sh).

    python scripts/patch_wheel.py SRC.whl OUT_DIR --version 0.10.0+py311 --requires-python ">=3.10" \\
        --sub FILE REGEX REPLACEMENT COUNT ... [--drop-requires NAME ...]

Every ``--sub`` must match exactly COUNT times (multiline regex), so an upstream change fails loudly instead of
being patched wrongly; ``--drop-requires`` removes ``Requires-Dist: NAME (...)`` lines from METADATA (each must be
there). The dist-info folder is renamed for the local version and RECORD is regenerated (sha256 + size of every
file). Pure Python (zipfile), no build tools. Prints the name of the patched wheel.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import re
import sys
import zipfile
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out_dir")
    ap.add_argument("--version", required=True, help="new (local) version, e.g. 0.10.0+py311")
    ap.add_argument("--requires-python", required=True)
    ap.add_argument("--sub", nargs=4, action="append", default=[], metavar=("FILE", "REGEX", "REPL", "COUNT"))
    ap.add_argument("--drop-requires", nargs="*", default=[])
    a = ap.parse_args(argv)

    src = Path(a.src)
    dist, old_v = src.name.split("-")[:2]
    old_di, new_di = f"{dist}-{old_v}.dist-info", f"{dist}-{a.version}.dist-info"
    files = {}
    with zipfile.ZipFile(src) as zin:
        for info in zin.infolist():
            if not info.is_dir():
                name = info.filename
                files[new_di + name[len(old_di):] if name.startswith(old_di + "/") else name] = zin.read(info.filename)

    def sub(name, pattern, repl, want):
        text, n = re.subn(pattern, repl, files[name].decode(), flags=re.M)
        if n != want:
            sys.exit(f"patch_wheel: {name}: {pattern!r} matched {n} times, expected {want}: upstream differs")
        files[name] = text.encode()

    for name, pattern, repl, count in a.sub:
        sub(name, pattern, repl.encode().decode("unicode_escape"), int(count))
    md = new_di + "/METADATA"
    sub(md, rf"^Version: {re.escape(old_v)}$", f"Version: {a.version}", 1)
    sub(md, r"^Requires-Python: .*$", f"Requires-Python: {a.requires_python}", 1)
    for req in a.drop_requires:
        sub(md, rf"^Requires-Dist: {re.escape(req)} \(.*\)\n", "", 1)

    rec = new_di + "/RECORD"
    lines = [f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}"
             for n, d in files.items() if n != rec]
    files[rec] = ("\n".join(lines + [f"{rec},,"]) + "\n").encode()
    out = Path(a.out_dir) / f"{dist}-{a.version}-py3-none-any.whl"
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for n, d in files.items():
            zout.writestr(n, d)
    tmp.replace(out)
    print(out.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
