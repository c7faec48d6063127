"""Print chosen columns of a results CSV as an aligned table (the last lines of the GPU scripts' output).

    python3 bench/print_csv.py FILE COLUMN [COLUMN ...]

A column the file lacks prints empty, so one call serves CSVs written before a column was added.
"""

import csv
import sys


def main(path: str, columns: list[str]) -> None:
    with open(path) as handle:
        rows = [[row.get(c) or "" for c in columns] for row in csv.DictReader(handle)]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    for line in [columns] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
