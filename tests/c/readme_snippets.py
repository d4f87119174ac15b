"""Writes the C and C++ code blocks of README.md's "From C and C++" section to files, so that
the tests compile and run exactly the code the README shows.

    readme_snippets.py README.md OUT_DIR  ->  OUT_DIR/readme_1.c, OUT_DIR/readme_2.cpp, ...
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SECTION = "## From C and C++"


def main() -> None:
    readme, out = Path(sys.argv[1]), Path(sys.argv[2])
    text = readme.read_text(encoding="utf-8")
    start = text.find(SECTION)
    if start < 0:
        sys.exit(f"{readme} has no '{SECTION}' section")
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end > 0 else len(text)]
    out.mkdir(parents=True, exist_ok=True)
    blocks = re.findall(r"^```(c|cpp)\n(.*?)^```", section, flags=re.M | re.S)
    if not any(lang == "c" for lang, _ in blocks) or not any(lang == "cpp" for lang, _ in blocks):
        sys.exit(f"{readme}: the '{SECTION}' section must show a C and a C++ block")
    for i, (lang, code) in enumerate(blocks, 1):
        path = out / f"readme_{i}.{lang}"
        if not path.exists() or path.read_text(encoding="utf-8") != code:  # keep mtimes: no needless rebuilds
            path.write_text(code, encoding="utf-8")


if __name__ == "__main__":
    main()
