"""Lay out Princeton WordNet 3.0 where NLTK reads it, from Debian's packages, without nltk.download.

NLTK's reader wants ``<dir>/corpora/wordnet/`` with the dictionary files plus a ``lexnames`` file that
Debian does not ship; we derive it from the ``lexnames(5WN)`` man page that ``wordnet-base`` carries.
Files are copied (NLTK refuses paths that resolve outside ``nltk.data.path``, symlinks included).
"""
from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
MAN_PAGE = Path("/usr/share/man/man5/lexnames.5WN.gz")
PACKAGES = ["wordnet-base", "wordnet-sense-index"]
POS_CODE = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
LEXNAME_LINE = re.compile(r"^(\d\d)\t([a-z]+\.[A-Za-z]+)\s*\t")


def _apt_install() -> None:
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = sudo + ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(cmd, env=env).returncode != 0:
        subprocess.run(sudo + ["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(cmd, env=env, check=True)


def _man_page_text() -> str:
    if MAN_PAGE.exists():
        return gzip.decompress(MAN_PAGE.read_bytes()).decode("utf-8", "replace")
    # Minimal images drop /usr/share/man on install; read the page out of the package itself.
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "wordnet-base"], cwd=tmp, check=True)
        deb = next(Path(tmp).glob("wordnet-base_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp + "/x"], check=True)
        page = Path(tmp) / "x" / MAN_PAGE.relative_to("/")
        return gzip.decompress(page.read_bytes()).decode("utf-8", "replace")


def lexnames_from_man(text: str) -> str:
    rows = []
    for line in text.splitlines():
        m = LEXNAME_LINE.match(line)
        if m:
            num, name = m.group(1), m.group(2)
            rows.append(f"{num}\t{name}\t{POS_CODE[name.split('.')[0]]}")
    if len(rows) != 45:
        raise SystemExit(f"expected 45 lexicographer files in lexnames(5WN), found {len(rows)}")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dest", required=True, help="NLTK data dir; files go to DEST/corpora/wordnet")
    args = ap.parse_args(argv)
    if not (WORDNET_DIR / "data.noun").exists() or not (WORDNET_DIR / "index.sense").exists():
        _apt_install()
    out = Path(args.dest) / "corpora" / "wordnet"
    out.mkdir(parents=True, exist_ok=True)
    for f in WORDNET_DIR.iterdir():
        if f.is_file():
            shutil.copyfile(f, out / f.name)
    tmp = out / "lexnames.tmp"
    tmp.write_text(lexnames_from_man(_man_page_text()))
    tmp.replace(out / "lexnames")
    print(f"WordNet 3.0 ready for NLTK in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
