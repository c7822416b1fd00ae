"""Write the README's supported-models table from what the coverage matrix ran.

    REGATE_MATRIX_JSON=/tmp/matrix.json python -m pytest tests/test_mm_matrix.py      # -m "" for all
    python scripts/mm_table.py /tmp/matrix.json            # rewrites the block in README.md

The block sits between `<!-- mm-matrix:begin -->` and `<!-- mm-matrix:end -->`. A family of the
matrix (tests/mm_models.py) that the JSON does not cover is listed as "not run"; the test
`tests/test_mm_matrix.py::test_readme_table_lists_the_matrix` checks the README against the table.
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- mm-matrix:begin -->", "<!-- mm-matrix:end -->"
INPUTS = {"image": "image", "images": "images (several per sample)", "video": "video", "text": "text"}


def render(results: dict) -> str:
    sys.path.insert(0, str(ROOT))
    from tests.mm_models import MM_FAMILIES, TEXT_FAMILIES

    lines = ["| family | model class | inputs tested | attention | result |", "|---|---|---|---|---|"]
    for fam in [*MM_FAMILIES, *TEXT_FAMILIES]:
        row = results.get(fam.name)
        if row is None:
            lines.append(f"| {fam.name} | | | | not run |")
            continue
        inputs = ", ".join(INPUTS.get(i, i) for i in row["inputs"])
        result = row["status"]
        note = getattr(fam, "note", "")
        if note:
            result += f" ({note})"
        lines.append(f"| {fam.name} | `{row.get('model', '')}` | {inputs} | {', '.join(row['attns'])} | {result} |")
    return "\n".join(lines)


def main(path: str) -> None:
    results = json.loads(pathlib.Path(path).read_text())
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{render(results)}\n{END}{tail}")
    print(f"README.md: {len(results)} families from {path}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
