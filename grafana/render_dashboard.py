#!/usr/bin/env python3
"""A picture of the dashboard drawn from a real Prometheus (docs/dashboard.png): every panel of
dashboards/model-orchestrator.json at its place on Grafana's 24-column grid, its queries evaluated over a time range
through Prometheus' HTTP API as Grafana would send them (variables set to All), drawn with matplotlib in Grafana's
dark theme. Grafana itself is not packaged for Debian, PyPI or npm, so the tests cannot run it; this shows what its
panels show, from the same queries and the same data.

  .venv/bin/python grafana/render_dashboard.py --prometheus http://127.0.0.1:9090 --minutes 15 --out dash.png

tests/test_grafana.py draws it from the Prometheus that scraped its scenario (`make screenshots` keeps the picture).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE / "dashboards" / "model-orchestrator.json"
BG, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0", "#37872d"]
NAMED = {"green": "#73bf69", "red": "#f2495c", "orange": "#ff9830", "blue": "#5794f2", "purple": "#b877d9"}

# query(expr, instant, start, end, step) -> Prometheus' `result` list (matrix for a range, vector for an instant)
Query = Callable[[str, bool, float, float, float], list]


def prometheus_query(url: str) -> Query:
    def query(expr: str, instant: bool, start: float, end: float, step: float) -> list:
        params = {"query": expr, "time": f"{end:.3f}"} if instant else \
            {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        path = "query" if instant else "query_range"
        with urllib.request.urlopen(f"{url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=30) as r:
            return json.loads(r.read())["data"]["result"]
    return query


def substitute(expr: str, values: dict[str, str], rate_interval: str, range_s: int) -> str:
    """The expression as Grafana sends it: template variables, $__rate_interval and $__range replaced."""
    for name, value in values.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    return expr.replace("$__rate_interval", rate_interval).replace("$__range", f"{range_s}s")


def panels(dashboard: dict) -> list[dict]:
    """Every panel and row header, collapsed rows' panels included."""
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def fmt(value: float, unit: str | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if unit == "bytes":
        for scale, name in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {name}"
        return f"{value:.0f} B"
    suffix = {"percentunit": " %", "celsius": " °C", "watt": " W", "s": " s", "reqps": " req/s",
              "tokens/s": " tok/s"}.get(unit or "", "")
    value = value * 100 if unit == "percentunit" else value
    return f"{value:.3g}{suffix}"


def _label(legend: str | None, metric: dict) -> str:
    if not legend:
        return ", ".join(f"{k}={v}" for k, v in metric.items() if k != "__name__") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), legend)


def _points(series: dict) -> tuple[list[float], list[float]]:
    pts = series.get("values") or [series["value"]]
    return [float(t) for t, _ in pts], [float(v) for _, v in pts]


def _mapping(panel: dict) -> dict[str, dict]:
    for m in panel.get("fieldConfig", {}).get("defaults", {}).get("mappings") or []:
        if m.get("type") == "value":
            return m["options"]
    return {}


def _scale(unit: str | None) -> tuple[float, str | None]:
    """Axis scale for a unit: bytes in GiB, ratios in %."""
    return {"bytes": (2**30, "GiB"), "percentunit": (0.01, "%")}.get(unit or "", (1, unit))


def draw_panel(ax, panel: dict, data: list[tuple[dict, list]], start: float, end: float) -> bool:
    """Draw one panel on `ax`; `data`: (target, result) pairs. True when it showed a value."""
    import matplotlib.dates as mdates  # x: days since 1970 (matplotlib's date numbers)
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    kind, unit = panel["type"], panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
    ax.set_facecolor(PANEL)
    ax.set_title(panel.get("title", ""), color=TEXT, fontsize=9, loc="left", pad=4)
    for spine in ax.spines.values():
        spine.set_color(GRID)
    ax.tick_params(colors=TEXT, labelsize=7)
    series = [(t, s) for t, result in data for s in result]
    if not series:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, "No data", color="#8e8e8e", ha="center", va="center", transform=ax.transAxes)
        return False
    if kind == "stat":
        _, values = _points(series[0][1])
        value = values[-1]
        shown = _mapping(panel).get(str(int(value)) if value == int(value) else "", {})
        color = NAMED.get(shown.get("color"), shown.get("color") or PALETTE[0])
        ax.text(0.5, 0.45, shown.get("text") or fmt(value, unit), color=color, fontsize=18, weight="bold",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return True
    if kind == "bargauge":
        names = [_label(t.get("legendFormat"), s["metric"]) for t, s in series]
        values = [_points(s)[1][-1] for _, s in series]
        div, name = _scale(unit)
        ax.barh(range(len(values)), [v / div for v in values], color=PALETTE[:len(values)] or PALETTE[0])
        ax.set_yticks(range(len(values)), names)
        for i, v in enumerate(values):
            ax.text(0, i, " " + fmt(v, unit), color=BG, va="center", fontsize=7, weight="bold")
        ax.invert_yaxis()
        return True
    if kind == "state-timeline":
        mapping = _mapping(panel)
        for row, (t, s) in enumerate(series):
            times, values = _points(s)
            for i, (t0, v) in enumerate(zip(times, values)):
                t1 = times[i + 1] if i + 1 < len(times) else end
                shown = mapping.get(str(int(v)), {})
                ax.barh(row, (t1 - t0) / 86400, left=t0 / 86400, height=0.8,
                        color=NAMED.get(shown.get("color"), shown.get("color", "#444")))
        ax.set_yticks(range(len(series)), [_label(t.get("legendFormat"), s["metric"]) for t, s in series])
        ax.invert_yaxis()
        handles = [Patch(color=NAMED.get(m["color"], m["color"]), label=m["text"]) for m in mapping.values()]
        ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(handles), fontsize=7,
                  frameon=False, labelcolor=TEXT)
    elif kind == "heatmap":
        buckets = sorted(series, key=lambda ts: float(ts[1]["metric"].get("le", "inf").replace("+Inf", "inf")))
        times = _points(buckets[0][1])[0]
        grid = [[0.0] * len(times) for _ in buckets]
        for row, (_, s) in enumerate(buckets):
            for t, v in zip(*_points(s)):
                if t in times:
                    grid[row][times.index(t)] = v
        for row in range(len(grid) - 1, 0, -1):  # cumulative `le` buckets -> per bucket
            grid[row] = [max(0.0, a - b) for a, b in zip(grid[row], grid[row - 1])]
        ax.imshow(grid, aspect="auto", origin="lower", cmap="Oranges", interpolation="nearest",
                  extent=(times[0] / 86400, times[-1] / 86400, 0, len(grid)))
        ax.set_yticks([i + 0.5 for i in range(len(buckets))], [b[1]["metric"].get("le") for b in buckets])
    else:  # timeseries
        div, name = _scale(unit)
        for i, (t, s) in enumerate(series):
            times, values = _points(s)
            ax.plot([x / 86400 for x in times], [v / div for v in values], color=PALETTE[i % len(PALETTE)],
                    linewidth=1.2, label=_label(t.get("legendFormat"), s["metric"]))
        if name:
            ax.set_ylabel(name, color=TEXT, fontsize=7)
        ax.grid(color=GRID, linewidth=0.5)
        ax.legend(loc="upper left", fontsize=6, frameon=False, labelcolor=TEXT, ncol=2)
    ax.set_xlim(start / 86400, end / 86400)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    ax.xaxis.set_major_locator(MaxNLocator(5))
    return True


def render(dashboard: dict, query: Query, start: float, end: float, out: Path, *, step: float = 1.0,
           rate_interval: str = "5s", values: dict[str, str] | None = None) -> dict[str, bool]:
    """Draw every panel into `out` (PNG); returns panel title -> whether it showed data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = values or {v["name"]: ".*" for v in dashboard["templating"]["list"] if v["type"] == "query"}
    laid = panels(dashboard)
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in laid)
    unit_w, unit_h = 0.7, 0.34  # inches per grid column and grid row
    fig = plt.figure(figsize=(24 * unit_w, (rows + 2) * unit_h), facecolor=BG)
    fig.text(0.01, 1 - 0.6 / (rows + 2), dashboard.get("title", ""), color=TEXT, fontsize=14, weight="bold")
    shown = {}
    for p in laid:
        g = p["gridPos"]
        left, width = g["x"] / 24, g["w"] / 24
        top, height = (g["y"] + 1.5) / (rows + 2), g["h"] / (rows + 2)
        if p["type"] == "row":
            fig.text(left + 0.005, 1 - top - height / 2, p.get("title", ""), color=TEXT, fontsize=11,
                     weight="bold", va="center")
            continue
        pad_left = 0.006 if p["type"] == "stat" else 0.006 + (0.06 if p["type"] in ("state-timeline", "bargauge")
                                                                 else 0.028)  # room for the y labels
        ax = fig.add_axes((left + pad_left, 1 - top - height + 0.3 / (rows + 2), width - pad_left - 0.006,
                           height - 1.0 / (rows + 2)))
        data = [(t, query(substitute(t["expr"], values, rate_interval, math.ceil(end - start)),
                          bool(t.get("instant")), start, end, step)) for t in p.get("targets", [])]
        shown[p.get("title", "")] = draw_panel(ax, p, data, start, end)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor=BG)
    plt.close(fig)
    return shown


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090")
    ap.add_argument("--minutes", type=float, default=15, help="the time range: the last N minutes")
    ap.add_argument("--out", type=Path, default=Path("dashboard.png"))
    args = ap.parse_args()
    end = time.time()
    step = max(1.0, args.minutes * 60 / 300)
    shown = render(json.loads(DASHBOARD.read_text()), prometheus_query(args.prometheus.rstrip("/")),
                   end - args.minutes * 60, end, args.out, step=step, rate_interval=f"{max(4 * step, 20):g}s")
    print(f"{args.out}: {sum(shown.values())} of {len(shown)} panels show data")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
