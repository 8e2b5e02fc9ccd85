"""Tables (markdown, also printed) and PNG plots of evaluation results (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .replay import ReplayLog
from .summary import markdown as summary_markdown


def _fmt(value: object) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def dump_json(obj: object) -> str:
    """JSON with two-space indents, except that a list of plain values (the per-user arrays)
    stays on one line."""
    return _dump(obj, 0) + "\n"


def _dump(obj: object, level: int) -> str:
    pad, end = "  " * (level + 1), "\n" + "  " * level
    if isinstance(obj, Mapping) and obj:
        items = [f"{pad}{json.dumps(str(key))}: {_dump(value, level + 1)}" for key, value in obj.items()]
        return "{\n" + ",\n".join(items) + end + "}"
    if isinstance(obj, list) and any(isinstance(v, (Mapping, list)) for v in obj):
        return "[\n" + ",\n".join(pad + _dump(v, level + 1) for v in obj) + end + "]"
    return json.dumps(obj)


def _total(t: object) -> str | None:
    if isinstance(t, Mapping):
        t = sum(t.values())
    return None if t is None else f"{float(t):.1f}"


def protocol_table(result: Mapping) -> str:
    """One markdown table of a protocol's results, methods as rows (seconds: fit + ranking)."""
    k, times = result["k"], {m: _total(t) for m, t in result.get("timings_s", {}).items()}
    if result["protocol"] == "user-cold":
        reveals = list(result["results"])
        methods = list(next(iter(result["results"].values()), {}))
        header = ["method"] + [f"recall@{k} {r}" for r in reveals] + [f"ndcg@{k} {r}" for r in reveals] + ["seconds"]
        rows = [[m] + [result["results"][r][m][f"recall@{k}"] for r in reveals]
                + [result["results"][r][m][f"ndcg@{k}"] for r in reveals] + [times.get(m)] for m in methods]
        return markdown_table(header, rows)
    metrics = list(next(iter(result["results"].values()), {}))
    rows = [[m] + [v[x] for x in metrics] + [times.get(m)] for m, v in result["results"].items()]
    return markdown_table(["method"] + metrics + ["seconds"], rows)


def split_line(result: Mapping) -> str:
    return ", ".join(f"{key} {value}" for key, value in result["split"].items())


def plot_user_cold(result: Mapping, path: Path) -> Path:
    """recall@K against the number of revealed positives, one line per method."""
    plt = _pyplot()
    k = result["k"]
    reveals = [int(r.split("=")[1]) for r in result["results"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in next(iter(result["results"].values())):
        ys = [result["results"][f"reveal={n}"][method][f"recall@{k}"] for n in reveals]
        ax.plot(reveals, ys, marker="o", label=method)
    ax.set(xlabel="positives revealed", ylabel=f"recall@{k}", xticks=reveals,
           title=f"user-cold on {result['dataset']} (seed {result['seed']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_bars(result: Mapping, path: Path) -> Path:
    """Two metrics per method, as bars: recall@K and ndcg@K (item-cold), recall@10 and ndcg@10
    (next-item)."""
    plt = _pyplot()
    res = result["results"]
    k = min(result["ks"]) if "ks" in result else result["k"]
    names = list(res)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.bar(x - 0.2, [res[m][f"recall@{k}"] for m in names], 0.4, label=f"recall@{k}")
    ax.bar(x + 0.2, [res[m][f"ndcg@{k}"] for m in names], 0.4, label=f"ndcg@{k}")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(title=f"{result['protocol']} on {result['dataset']} (seed {result['seed']})")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_replay(result: Mapping, log: ReplayLog, path: Path) -> Path:
    """Hit rate over the stream: a moving average over the replayed positives, per method."""
    plt = _pyplot()
    n = len(log.cold_user)
    window = max(1, min(500, n // 10))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, hits in log.hits.items():
        if n:
            avg = np.convolve(hits.astype(float), np.ones(window) / window, mode="valid")
            ax.plot(np.arange(window, n + 1), avg, label=name)
    ax.set(xlabel="replayed positive events (time order)", ylabel=f"hit rate@{result['k']} (moving {window})",
           title=f"replay on {result['dataset']} (seed {result['seed']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_report(results: list[Mapping], logs: Mapping[str, ReplayLog], path: Path,
                 summary: Mapping | None = None) -> list[Path]:
    """Markdown at `path`: the summary (every method's mean over seeds, each target's ratio,
    interval and verdict), then each run's table; plots beside it as STEM-PROTOCOL.png, of the
    first seed of each protocol. Returns the files written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# Evaluation of {results[0]['dataset']}\n"] if results else []
    if summary is not None:
        parts += ["## Summary\n", summary_markdown(summary)]
    written: list[Path] = []
    for res in results:
        protocol = res["protocol"]
        png = path.with_name(f"{path.stem}-{protocol}.png")
        plotted = png not in written and _plot(res, logs, png)
        if plotted:
            written.append(png)
        parts += [f"## {protocol}, seed {res['seed']}\n",
                  f"{res.get('split_kind', 'test')} split, k {res['k']}, min_value {res['min_value']}; "
                  f"split: {split_line(res)}\n", protocol_table(res) + "\n"]
        if plotted:
            parts.append(f"![{protocol}]({png.name})\n")
    path.write_text("\n".join(parts), encoding="utf-8")
    return [path] + written


def _plot(result: Mapping, logs: Mapping[str, ReplayLog], png: Path) -> bool:
    protocol = result["protocol"]
    if protocol == "user-cold":
        plot_user_cold(result, png)
    elif protocol in ("item-cold", "next-item"):
        plot_bars(result, png)
    elif protocol in logs:
        plot_replay(result, logs[protocol], png)
    else:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
