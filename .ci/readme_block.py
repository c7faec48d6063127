"""Print the shell lines of one README block marked `<!-- ci:NAME ... -->` (the fenced block right after it).

.ci/run executes what this prints, so CI runs exactly what the README tells a new user to type; a missing or
empty block is an error (exit 2) rather than a CI that quietly runs nothing.
"""

import pathlib
import re
import sys


def block(readme: str, name: str) -> list[str]:
    match = re.search(rf"<!-- ci:{re.escape(name)}\b[^>]*-->\s*```[a-z]*\n(.*?)```", readme, re.S)
    if match is None:
        raise SystemExit(f"README.md: no fenced block after a '<!-- ci:{name} -->' marker")
    lines = [line for line in match.group(1).splitlines() if line.strip()]  # verbatim, comments included
    if not lines:
        raise SystemExit(f"README.md: the '<!-- ci:{name} -->' block has no commands")
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: readme_block.py NAME")
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    print("\n".join(block(readme, sys.argv[1])))
