"""Write docs/models.md's table of Hugging Face MoE families from what tests/integration/test_families.py measured.

``make families-table`` runs the family tests with ``FCMOE_FAMILY_ROWS=FILE`` (each passing case
appends one JSON row: what trains, what DP supports) and then this script, which replaces the text
between the table markers in docs/models.md. The table is never edited by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BEGIN, END = "<!-- families table: begin (make families-table) -->", "<!-- families table: end -->"
COLUMNS = [("model_type", "model_type"), ("class", "class"), ("moe_layers", "MoE layers (of 2)"),
           ("lora", "experts by LoRA"), ("full", "experts in full"), ("router", "router"),
           ("shared", "shared experts"), ("attention_lora", "attention LoRA"), ("routing", "routing read from"),
           ("dp_full", "DP, full experts"), ("dp_lora", "DP, LoRA")]


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render(rows: list[dict], excluded: dict[str, str]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in sorted(rows, key=lambda r: r["model_type"]):
        lines.append("| " + " | ".join(_cell(row.get(key, "")) for key, _ in COLUMNS) + " |")
    for model_type, reason in sorted(excluded.items()):
        lines.append(f"| {model_type} | excluded: {_cell(reason)} |" + " |" * (len(COLUMNS) - 2))
    return "\n".join(lines)


def main(rows_file: str, doc: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from families import EXCLUDED

    rows = [json.loads(line) for line in Path(rows_file).read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{rows_file}: no rows (did the family tests run with FCMOE_FAMILY_ROWS?)")
    text = Path(doc).read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc}: the table markers are missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    Path(doc).write_text(f"{head}{BEGIN}\n{render(rows, EXCLUDED)}\n{END}{tail}")
    print(f"{doc}: {len(rows)} families, {len(EXCLUDED)} excluded")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python tools/family_table.py ROWS.jsonl docs/models.md")
    main(sys.argv[1], sys.argv[2])
