"""The evaluation report: one table per run, a row per model, in Markdown and JSON, and a PNG chart.

Columns follow the Tuna paper's Table 1 (Super-NI 0-shot and 2-shot ROUGE-L, the LMentry score, Vicuna QA
win / lose / tie against a baseline, in percent of the judged questions) plus the AlpacaEval win rate when
it was run; only the benchmarks a run configured get a column. Failures and missing items are never folded
into the numbers, they are reported beside them; the notes say which review protocol each column used.
The JSON table is the source of truth: :func:`write_report` renders the Markdown and the chart from it,
:func:`render_report` re-renders them from a saved JSON. matplotlib is imported only when a chart is drawn
(Agg backend, no display needed).

The JSON table's fields, the cells and the chart: docs/evaluation.md#report.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from typing import Any, Mapping, Sequence

__all__ = ["COLUMNS", "SCALAR_COLUMNS", "make_table", "to_markdown", "plot_table", "write_report",
           "render_report"]

# key -> header; order is the table's column order
COLUMNS: dict[str, str] = {
    "superni_0shot": "Super-NI 0-shot",
    "superni_2shot": "Super-NI 2-shot",
    "lmentry": "LMentry",
    "vicuna": "Vicuna QA win / lose / tie %",
    "alpaca_eval": "AlpacaEval win %",
}
SCALAR_COLUMNS = ("superni_0shot", "superni_2shot", "lmentry")
_PROTOCOLS = {"one": "in one order, the model as Assistant 1 (FastChat's default; the Tuna paper does not say "
                     "which order it used)",
              "both": "in both orders, a win or loss only when the orders agree, else a tie (ours, not the "
                      "paper's)"}
_DASH = "-"


def make_table(name: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *,
               notes: Sequence[str] = (), settings: Mapping[str, Any] | None = None) -> dict:
    """The JSON table. ``rows``: dicts with "model" and any of the column keys; unknown columns are errors."""
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise ValueError(f"unknown report columns {unknown}; known: {list(COLUMNS)}")
    out_rows = []
    for r in rows:
        if "model" not in r:
            raise ValueError("every report row needs a 'model'")
        row = {"model": r["model"], "path": r.get("path")}
        for c in columns:
            row[c] = r.get(c)
        row["details"] = dict(r.get("details") or {})
        if r.get("published"):
            row["published"] = dict(r["published"])
        out_rows.append(row)
    return {"name": name, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "columns": list(columns), "rows": out_rows, "notes": list(notes), "settings": dict(settings or {})}


def _cell(column: str, value: Any) -> str:
    if value is None:
        return _DASH
    if column == "vicuna":
        counts = [value["win"], value["lose"], value["tie"]]
        judged = sum(counts)
        if not judged:
            s = _DASH
        else:
            s = " / ".join(f"{100.0 * c / judged:.1f}" for c in counts) + f" ({' / '.join(map(str, counts))})"
        if value.get("failed"):
            s += f" ({value['failed']} failed)"
        return s
    if column == "alpaca_eval":
        if value.get("win_rate") is None:
            return _DASH
        s = f"{value['win_rate']:.2f}"
        if value.get("win_rate_stderr") is not None:
            s += f" ± {value['win_rate_stderr']:.2f}"
        if value.get("failed"):
            s += f" ({value['failed']} failed)"
        return s
    return f"{float(value):.2f}"


def _published_cell(column: str, value: Any) -> str:
    """A paper's number as the config gives it (no digits added); Vicuna QA as win / lose / tie percent."""
    if value is None:
        return _DASH
    if column == "vicuna":
        return " / ".join(f"{float(v):g}" for v in value)
    return f"{float(value):g}"


def to_markdown(table: Mapping[str, Any]) -> str:
    """A Markdown document: title, the table (a row's published numbers on the line below it), and the notes
    (baselines, judges, limits, failures)."""
    cols = table["columns"]
    lines = [f"# {table['name']}", ""]
    lines.append("| Model | " + " | ".join(COLUMNS[c] for c in cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    for r in table["rows"]:
        lines.append(f"| {r['model']} | " + " | ".join(_cell(c, r.get(c)) for c in cols) + " |")
        if r.get("published"):
            p = r["published"]
            lines.append(f"| {r['model']} (published: {p['table']}) | "
                         + " | ".join(_published_cell(c, p.get(c)) for c in cols) + " |")
    notes = list(table.get("notes") or [])
    if any(r.get("published") for r in table["rows"]):
        notes.append("A row marked (published: TABLE) holds the numbers the paper gives for that model, as the eval "
                     "config writes them; the row above it is this run, on this run's data and settings.")
    for c in ("vicuna", "alpaca_eval"):
        if c in cols:
            bases = sorted({str(r[c]["baseline"]) for r in table["rows"] if r.get(c) and r[c].get("baseline")})
            judges = sorted({str(r[c]["judge"]) for r in table["rows"] if r.get(c) and r[c].get("judge")})
            orders = sorted({str(r[c].get("orders", "both")) for r in table["rows"] if r.get(c)})
            if bases:
                notes.append(f"{COLUMNS[c]}: against {', '.join(bases)}, judged by {', '.join(judges) or '?'} "
                             f"{' and '.join(_PROTOCOLS.get(o, o) for o in orders)}.")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    lines.append("")
    return "\n".join(lines)


def plot_table(table: Mapping[str, Any], path: str | os.PathLike) -> str:
    """Draws the chart (see docs/evaluation.md#report) to ``path`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    path = os.fspath(path)
    rows = table["rows"]
    models = [r["model"] for r in rows]
    cols = table["columns"]
    metrics = [c for c in cols if c in SCALAR_COLUMNS]
    if "alpaca_eval" in cols:
        metrics.append("alpaca_eval")
    has_vicuna = "vicuna" in cols and any(r.get("vicuna") for r in rows)
    panels = int(bool(metrics)) + int(has_vicuna)
    fig, axes = plt.subplots(1, max(1, panels), figsize=(6.5 * max(1, panels), 4.2), squeeze=False)
    axes = list(axes[0])
    colors = plt.get_cmap("tab10")

    if metrics:
        ax = axes.pop(0)
        x = np.arange(len(metrics))
        width = 0.8 / max(1, len(models))
        for i, r in enumerate(rows):
            vals = []
            for m in metrics:
                v = r.get(m)
                if m == "alpaca_eval":
                    v = v.get("win_rate") if v else None
                vals.append(np.nan if v is None else float(v))
            pos = x - 0.4 + width * (i + 0.5)
            bars = ax.bar(pos, np.nan_to_num(vals, nan=0.0), width, label=r["model"], color=colors(i % 10))
            for b, v in zip(bars, vals):
                ax.annotate(_DASH if np.isnan(v) else f"{v:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(x, [COLUMNS[m].replace(" win %", " win rate") for m in metrics])
        ax.set_ylabel("score (0-100)")
        ax.set_ylim(0, 105)
        ax.legend(fontsize=8, ncol=min(4, len(models)), loc="upper center", bbox_to_anchor=(0.5, -0.1),
                  frameon=False)
        ax.set_title("Super-NI ROUGE-L, LMentry score" + (", AlpacaEval" if "alpaca_eval" in metrics else ""))
        ax.grid(axis="y", alpha=0.3)

    if has_vicuna:
        ax = axes.pop(0)
        y = np.arange(len(rows))
        left = np.zeros(len(rows))
        for key, color in (("win", "#2ca02c"), ("tie", "#bbbbbb"), ("lose", "#d62728")):
            vals = np.array([float((r.get("vicuna") or {}).get(key, 0)) for r in rows])
            ax.barh(y, vals, left=left, color=color, label=key)
            for yi, (l, v) in enumerate(zip(left, vals)):
                if v:
                    ax.text(l + v / 2, yi, f"{int(v)}", ha="center", va="center", fontsize=8)
            left += vals
        for yi, r in enumerate(rows):
            if not r.get("vicuna"):
                ax.text(0.5, yi, "not reviewed", va="center", fontsize=8, color="gray")
        ax.set_yticks(y, models)
        ax.invert_yaxis()
        ax.set_xlabel("questions")
        bases = sorted({str(r["vicuna"].get("baseline")) for r in rows if r.get("vicuna")})
        ax.set_title(f"Vicuna QA vs {', '.join(bases)}")
        ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)

    if panels == 0:
        axes[0].text(0.5, 0.5, "no results", ha="center", va="center")
        axes[0].set_axis_off()
    fig.suptitle(table["name"])
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(table: Mapping[str, Any], out_dir: str | os.PathLike, stem: str | None = None,
                 chart: bool = True) -> dict[str, str]:
    """Writes ``STEM.json``, ``STEM.md`` and (``chart``) ``STEM.png`` into ``out_dir``; returns their paths."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    stem = stem or table["name"]
    paths = {"json": os.path.join(out_dir, stem + ".json"), "markdown": os.path.join(out_dir, stem + ".md")}
    _atomic_write(paths["json"], json.dumps(table, indent=2, ensure_ascii=False) + "\n")
    _atomic_write(paths["markdown"], to_markdown(table))
    if chart:
        paths["png"] = plot_table(table, os.path.join(out_dir, stem + ".png"))
    return paths


def render_report(json_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Re-renders the Markdown and the chart of a saved JSON table (e.g. after editing model names)."""
    json_path = os.fspath(json_path)
    with open(json_path, encoding="utf-8") as f:
        table = json.load(f)
    for key in ("name", "columns", "rows"):
        if key not in table:
            raise ValueError(f"{json_path}: not a tuna-jax eval table (no '{key}')")
    stem = os.path.splitext(os.path.basename(json_path))[0]
    return write_report(table, out_dir or os.path.dirname(os.path.abspath(json_path)), stem)
