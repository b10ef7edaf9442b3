"""Build the Grafana dashboard `grafana/dashboards/model-orchestrator.json` with Grafana's foundation SDK.

    .venv/bin/python grafana/build_dashboard.py          # (re)write the JSON
    .venv/bin/python grafana/build_dashboard.py --check  # exit 1 if the committed JSON differs

The JSON is generated, never edited by hand: tests/test_grafana.py checks the committed file equals this script's
output, evaluates every panel's query against a real Prometheus scraping a real sidecar, and checks every metric
name used here is one the sidecar exports (metrics.py).

Every panel reads only the sidecar's own /metrics (plus Prometheus' `up`). GPU rows stay empty in CPU mode, where
the sidecar exports no per-GPU series (model_orchestrator_gpu_available is 0 then, which the overview shows).
Every query selects the `node` variable (a target label Prometheus gives each sidecar: its machine); the "Nodes" row
shows them side by side. The Kubernetes ConfigMap of the dashboard is rendered from this too (`configmap()`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, common as cb, dashboard as db, heatmap, prometheus
from grafana_foundation_sdk.builders import stat, statetimeline, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common, dashboard as dm, heatmap as hm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT = Path(__file__).resolve().parent / "dashboards" / "model-orchestrator.json"
# the same dashboard as a ConfigMap for Grafana's dashboard sidecar in Kubernetes (label grafana_dashboard: "1")
OUT_CONFIGMAP = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "grafana-dashboard.yaml"
UID = "model-orchestrator"
JOB = "model-orchestrator"  # the scrape job of grafana/prometheus.yml
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
N = 'node=~"$node"'  # every query: the nodes selected (Prometheus' target label `node`, see grafana/README.md)
M = 'model=~"$model"'
G = 'gpu=~"$gpu"'
RI = "$__rate_interval"

# model_orchestrator_model_state as one number per model, for the state timeline (value mappings below)
STATES = ["unloaded", "downloading", "loading", "loaded", "unloading", "failed"]
STATE_COLORS = {"unloaded": "#808080", "downloading": "purple", "loading": "blue", "loaded": "green",
                "unloading": "orange", "failed": "red"}


def events(selector: str, window: str = RI) -> str:
    """Events a counter counted in `window`, including a series' first ones. The sidecar creates a labelled counter
    at its first event (the first crash of a model, the first 503 of a route), so plain increase() would see it go
    from "absent" to 1 and count nothing: a series that did not exist `window` ago counts with its whole value."""
    return f"(({selector} unless {selector} offset {window}) or increase({selector}[{window}]))"


def q(expr: str, legend: str = "", *, ref: str = "A", instant: bool = False, fmt: PromQueryFormat | None = None):
    t = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DS)
    if legend:
        t = t.legend_format(legend)
    t = t.instant() if instant else t.range()
    if fmt is not None:
        t = t.format(fmt)
    return t


def steps(*pairs) -> cb.Builder:
    """Threshold steps: (None, base colour), (value, colour), ..."""
    return (db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE)
            .steps([dm.Threshold(value=v, color=c) for v, c in pairs]))


def legend_table(*calcs: str) -> cb.VizLegendOptions:
    return (cb.VizLegendOptions().display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.RIGHT if len(calcs) < 2 else common.LegendPlacement.BOTTOM)
            .show_legend(True).calcs(list(calcs)))


def ts(title: str, desc: str, unit: str, *targets, h: int = 8, w: int = 12, stack: bool = False,
       thresholds=None, minimum: float | None = 0, maximum: float | None = None, bars: bool = False,
       calcs=("lastNotNull", "max")) -> timeseries.Panel:
    p = (timeseries.Panel().title(title).description(desc).unit(unit).height(h).span(w).datasource(DS)
         .fill_opacity(60 if (stack or bars) else 12).line_width(1 if bars else 2)
         .legend(legend_table(*calcs))
         .tooltip(cb.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)))
    if minimum is not None:
        p = p.min(minimum)
    if maximum is not None:
        p = p.max(maximum)
    if stack:
        p = p.stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL))
    if bars:
        p = p.draw_style(common.GraphDrawStyle.BARS).stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL))
    if thresholds is not None:
        p = p.thresholds(thresholds).thresholds_style(
            cb.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED))
    for i, t in enumerate(targets):
        p = p.with_target(t.ref_id(chr(ord("A") + i)))
    return p


def st(title: str, desc: str, unit: str, target, *, thresholds, w: int = 3, h: int = 4, mappings=None,
       graph: bool = False) -> stat.Panel:
    p = (stat.Panel().title(title).description(desc).unit(unit).height(h).span(w).datasource(DS)
         .thresholds(thresholds).color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
         .graph_mode(common.BigValueGraphMode.AREA if graph else common.BigValueGraphMode.NONE)
         .color_mode(common.BigValueColorMode.VALUE)
         .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
         .with_target(target))
    if mappings:
        p = p.mappings(mappings)
    return p


def build() -> dm.Dashboard:
    d = (db.Dashboard("Model orchestrator: GPUs and models").uid(UID)
         .description("VRAM per GPU and who holds it (each model's llama-server, other processes), GPU load, "
                      "model lifecycle, chat throughput and latency, API errors. Source: the model-orchestrator "
                      "sidecar's /metrics.")
         .tags(["model-orchestrator", "llama.cpp", "gpu"])
         .editable().timezone("browser").refresh("10s").time("now-1h", "now")
         .tooltip(dm.DashboardCursorSync.CROSSHAIR)
         .timepicker(db.TimePicker().refresh_intervals(["5s", "10s", "30s", "1m", "5m"]))
         .link(db.DashboardLink("Sidecar API docs").type(dm.DashboardLinkType.LINK).url("http://localhost:8000/docs")
               .target_blank(True).icon("doc")))

    d = d.with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    # All = ".*": also the series of a Prometheus that gives its one sidecar no node label
    d = d.with_variable(
        db.QueryVariable("node").label("Node").datasource(DS)
        .description("The machine of a sidecar: Prometheus' target label `node` (in Kubernetes the pod's node)")
        .query({"query": "label_values(model_orchestrator_gpu_available, node)", "refId": "node"})
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.NATURAL_ASC)
        .multi(True).include_all(True).all_value(".*").current(dm.VariableOption(text="All", value="$__all")))
    d = d.with_variable(
        db.QueryVariable("gpu").label("GPU").datasource(DS).description("GPU index as NVML numbers them")
        .query({"query": "label_values(model_orchestrator_gpu_memory_total_bytes, gpu)", "refId": "gpu"})
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.NATURAL_ASC)
        .multi(True).include_all(True).current(dm.VariableOption(text="All", value="$__all")))
    d = d.with_variable(
        db.QueryVariable("model").label("Model").datasource(DS).description("Model id from the registry")
        .query({"query": "label_values(model_orchestrator_model_state, model)", "refId": "model"})
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True).include_all(True).current(dm.VariableOption(text="All", value="$__all")))

    # ---- overview: what an operator looks at first ----------------------------------------------------------
    ok_red = steps((None, "red"), (1, "green"))
    d = d.with_row(db.Row("Overview"))
    d = d.with_panel(st("Sidecar up", "Prometheus reached the sidecar's /metrics at the last scrape", "none",
                        q(f'up{{job="{JOB}", {N}}}', "{{node}}", instant=True), thresholds=ok_red,
                        mappings=[dm.ValueMap(options={"0": dm.ValueMappingResult(text="DOWN", color="red"),
                                                       "1": dm.ValueMappingResult(text="UP", color="green")})]))
    d = d.with_panel(st("GPU mode", "1 when NVML sees a GPU; 0 means CPU mode (no GPU panels then)", "none",
                        q(f"max(model_orchestrator_gpu_available{{{N}}})", instant=True), thresholds=steps((None, "orange"), (1, "green")),
                        mappings=[dm.ValueMap(options={"0": dm.ValueMappingResult(text="CPU mode", color="orange"),
                                                       "1": dm.ValueMappingResult(text="GPU", color="green")})]))
    d = d.with_panel(st("VRAM used", "Memory in use on the selected GPUs, all processes", "percentunit",
                        q(f"sum(model_orchestrator_gpu_memory_used_bytes{{{N}, {G}}}) / sum(model_orchestrator_gpu_memory_total_bytes{{{N}, {G}}})"),
                        thresholds=steps((None, "green"), (0.85, "orange"), (0.95, "red")), graph=True))
    d = d.with_panel(st("VRAM free", "Memory free on the selected GPUs: what the next model can take", "bytes",
                        q(f"sum(model_orchestrator_gpu_memory_free_bytes{{{N}, {G}}})"),
                        thresholds=steps((None, "red"), (2 * 1024**3, "orange"), (8 * 1024**3, "green")), graph=True))
    d = d.with_panel(st("VRAM held by other processes", "GPU memory of processes the orchestrator does not own "
                        "(other services, desktop): it cannot evict them", "bytes",
                        q(f"sum(model_orchestrator_gpu_foreign_memory_bytes{{{N}, {G}}})", instant=True),
                        thresholds=steps((None, "green"), (1024**3, "orange"))))
    d = d.with_panel(st("Models loaded", "Models whose llama-server is running and ready", "none",
                        q(f'sum(model_orchestrator_model_state{{{N}, state="loaded"}})', instant=True),
                        thresholds=steps((None, "blue"))))
    d = d.with_panel(st("Models failed", "Models in state failed (a load that failed, or a crash); the next load "
                        "retries", "none", q(f'sum(model_orchestrator_model_state{{{N}, state="failed"}})', instant=True),
                        thresholds=steps((None, "green"), (1, "red"))))
    chat_5xx = events(f'llamacpp_requests_total{{{N}, status=~"5.."}}', "5m")
    chat_all = events(f"llamacpp_requests_total{{{N}}}", "5m")
    d = d.with_panel(st("Chat 5xx ratio", "Share of OpenAI-API requests answered 5xx over the last 5 minutes", "percentunit",
                        q(f"sum({chat_5xx}) / sum({chat_all})", instant=True),
                        thresholds=steps((None, "green"), (0.01, "orange"), (0.05, "red"))))

    # ---- the fleet: each node side by side ------------------------------------------------------------------
    d = d.with_row(db.Row("Nodes"))
    d = d.with_panel(
        bargauge.Panel().title("VRAM free per node").description("GPU memory free on each node's selected GPUs: "
                                                                 "where the next model fits")
        .unit("bytes").height(8).span(8).datasource(DS).min(0)
        .display_mode(common.BarGaugeDisplayMode.GRADIENT).orientation(common.VizOrientation.HORIZONTAL)
        .thresholds(steps((None, "red"), (2 * 1024**3, "orange"), (8 * 1024**3, "green")))
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(q(f"sum by (node) (model_orchestrator_gpu_memory_free_bytes{{{N}, {G}}})", "{{node}}",
                       instant=True)))
    d = d.with_panel(ts("VRAM used per node", "Used share of each node's selected GPUs, all processes", "percentunit",
                        q(f"sum by (node) (model_orchestrator_gpu_memory_used_bytes{{{N}, {G}}}) / sum by (node) "
                          f"(model_orchestrator_gpu_memory_total_bytes{{{N}, {G}}})", "{{node}}"),
                        maximum=1, thresholds=steps((None, "green"), (0.85, "orange"), (0.95, "red")), w=8))
    d = d.with_panel(ts("Requests/s per node", "OpenAI-API requests each node's sidecar proxied, all models",
                        "reqps", q(f"sum by (node) (rate(llamacpp_requests_total{{{N}, {M}}}[{RI}]))", "{{node}}"),
                        w=8))
    d = d.with_panel(ts("Which model is loaded where", "1 while a model is loaded on a node: a model on two nodes "
                        "shows twice", "short",
                        q(f'sum by (node, model) (model_orchestrator_model_state{{{N}, {M}, state="loaded"}})',
                          "{{model}} on {{node}}"), w=16, calcs=("lastNotNull",)))
    d = d.with_panel(
        bargauge.Panel().title("Models loaded per node").description("Models whose llama-server runs on each node")
        .unit("none").height(8).span(8).datasource(DS).min(0)
        .display_mode(common.BarGaugeDisplayMode.GRADIENT).orientation(common.VizOrientation.HORIZONTAL)
        .thresholds(steps((None, "blue")))
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(q(f'sum by (node) (model_orchestrator_model_state{{{N}, {M}, state="loaded"}})', "{{node}}",
                       instant=True)))

    # ---- GPUs -----------------------------------------------------------------------------------------------
    d = d.with_row(db.Row("GPU memory"))
    d = d.with_panel(
        ts("VRAM by holder", "Stacked: each model's llama-server, other processes, free; the dashed line is the "
           "card's total. Per GPU as selected.", "bytes",
           q(f"sum by (model) (model_orchestrator_model_vram_bytes{{{N}, {G}, {M}}})", "{{model}}"),
           q(f"sum(model_orchestrator_gpu_foreign_memory_bytes{{{N}, {G}}})", "other processes"),
           q(f"sum(model_orchestrator_gpu_memory_free_bytes{{{N}, {G}}})", "free"),
           q(f"sum(model_orchestrator_gpu_memory_total_bytes{{{N}, {G}}})", "total"),
           stack=True, w=16, h=9)
        .override_by_name("total", [dm.DynamicConfigValue("custom.stacking", {"mode": "none", "group": "A"}),
                                    dm.DynamicConfigValue("custom.fillOpacity", 0),
                                    dm.DynamicConfigValue("custom.lineStyle", {"fill": "dash", "dash": [10, 10]}),
                                    dm.DynamicConfigValue("color", {"mode": "fixed", "fixedColor": "text"})])
        .override_by_name("free", [dm.DynamicConfigValue("color", {"mode": "fixed", "fixedColor": "#73BF6933"})])
        .override_by_name("other processes", [dm.DynamicConfigValue("color", {"mode": "fixed", "fixedColor": "purple"})]))
    d = d.with_panel(
        bargauge.Panel().title("VRAM per model now").description("GPU memory each model's llama-server holds (NVML), "
                                                                 "summed over the selected GPUs")
        .unit("bytes").height(9).span(8).datasource(DS).min(0)
        .display_mode(common.BarGaugeDisplayMode.GRADIENT).orientation(common.VizOrientation.HORIZONTAL)
        .thresholds(steps((None, "green"), (40 * 1024**3, "orange"), (70 * 1024**3, "red")))
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(q(f"sum by (model) (model_orchestrator_model_vram_bytes{{{N}, {G}, {M}}})", "{{model}}", instant=True)))
    d = d.with_panel(
        ts("VRAM used per GPU", "Used share of each card, all processes", "percentunit",
           q(f"model_orchestrator_gpu_memory_used_bytes{{{N}, {G}}} / model_orchestrator_gpu_memory_total_bytes{{{N}, {G}}}",
             "GPU {{gpu}} {{name}}"),
           maximum=1, thresholds=steps((None, "green"), (0.85, "orange"), (0.95, "red")), w=12))
    d = d.with_panel(
        ts("VRAM per GPU", "Used, free and total memory of each card", "bytes",
           q(f"model_orchestrator_gpu_memory_used_bytes{{{N}, {G}}}", "used GPU {{gpu}}"),
           q(f"model_orchestrator_gpu_memory_free_bytes{{{N}, {G}}}", "free GPU {{gpu}}"),
           q(f"model_orchestrator_gpu_memory_total_bytes{{{N}, {G}}}", "total GPU {{gpu}}"), w=12))

    d = d.with_row(db.Row("GPU load"))
    d = d.with_panel(ts("GPU utilisation", "Busy fraction over NVML's sample period", "percentunit",
                        q(f"model_orchestrator_gpu_utilization_ratio{{{N}, {G}}}", "GPU {{gpu}} {{name}}"),
                        maximum=1, thresholds=steps((None, "green"), (0.9, "orange")), w=8, calcs=("mean", "max")))
    d = d.with_panel(ts("GPU temperature", "Core temperature; most cards throttle from about 83-87 °C", "celsius",
                        q(f"model_orchestrator_gpu_temperature_celsius{{{N}, {G}}}", "GPU {{gpu}} {{name}}"),
                        minimum=None, thresholds=steps((None, "green"), (80, "orange"), (88, "red")), w=8))
    d = d.with_panel(ts("GPU power", "Power draw (absent on boards that do not report it)", "watt",
                        q(f"model_orchestrator_gpu_power_watts{{{N}, {G}}}", "GPU {{gpu}} {{name}}"), w=8, calcs=("mean", "max")))

    # ---- models ---------------------------------------------------------------------------------------------
    d = d.with_row(db.Row("Models"))
    state_expr = "\n+ ".join(f'{i} * sum by (model) (model_orchestrator_model_state{{{N}, {M}, state="{s}"}})'
                             for i, s in enumerate(STATES) if i > 0)
    d = d.with_panel(
        statetimeline.Panel().title("Model state").description("Lifecycle of each model: unloaded, loading, loaded, "
                                                               "unloading, failed")
        .height(8).span(24).datasource(DS).show_value(common.VisibilityMode.NEVER).merge_values(True)
        .row_height(0.8).fill_opacity(80)
        .mappings([dm.ValueMap(options={str(i): dm.ValueMappingResult(text=s, color=STATE_COLORS[s], index=i)
                                        for i, s in enumerate(STATES)})])
        .legend(cb.VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM))
        .with_target(q(f"0 * sum by (model) (model_orchestrator_model_state{{{N}, {M}, state=\"unloaded\"}})\n+ {state_expr}",
                       "{{model}}")))
    d = d.with_panel(
        heatmap.Panel().title("Load duration").description("Load request to llama-server ready, histogram per time "
                                                            "bucket (model_orchestrator_load_duration_seconds)")
        .height(8).span(8).datasource(DS).calculate(False)
        .color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME).scheme("Oranges")
               .scale(hm.HeatmapColorScale.EXPONENTIAL).exponent(0.5).steps(64))
        .y_axis(heatmap.YAxisConfig().unit("s"))
        .cell_values(heatmap.CellValues().unit("short"))
        .with_target(q(f"sum by (le) ({events(f'model_orchestrator_load_duration_seconds_bucket{{{N}, {M}}}')})",
                       "{{le}}", fmt=PromQueryFormat.HEATMAP)))
    d = d.with_panel(
        bargauge.Panel().title("Load time p50 / p95 (time range)").description("Quantiles of load durations over "
                                                                             "the dashboard's time range")
        .unit("s").height(8).span(8).datasource(DS).min(0)
        .display_mode(common.BarGaugeDisplayMode.GRADIENT).orientation(common.VizOrientation.HORIZONTAL)
        .thresholds(steps((None, "green"), (30, "orange"), (120, "red")))
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(q(f"histogram_quantile(0.5, sum by (le, model) ({events(f'model_orchestrator_load_duration_seconds_bucket{{{N}, {M}}}', '$__range')}))",
                       "{{model}} p50", instant=True))
        .with_target(q(f"histogram_quantile(0.95, sum by (le, model) ({events(f'model_orchestrator_load_duration_seconds_bucket{{{N}, {M}}}', '$__range')}))",
                       "{{model}} p95", instant=True, ref="B")))
    d = d.with_panel(ts("Loads by result", "Load attempts: loaded, failed (bad file, crash during start, timeout), "
                        "cancelled (an unload during the load)", "short",
                        q(f"sum by (model, result) ({events(f'model_orchestrator_model_loads_total{{{N}, {M}}}')})",
                          "{{model}} {{result}}"), bars=True, w=8, calcs=("sum",))
                     .override_by_regexp(".* failed", [dm.DynamicConfigValue("color", {"mode": "fixed", "fixedColor": "red"})]))
    d = d.with_panel(ts("Downloads by result", "Downloads of a model's missing files before its first load: finished, "
                        "failed (Hub unreachable, disk full, bad checksum), cancelled (an unload); while one runs "
                        "the model is `downloading` and model_orchestrator_download_bytes shows its progress",
                        "short",
                        q(f"sum by (model, result) ({events(f'model_orchestrator_downloads_total{{{N}, {M}}}')})",
                          "{{model}} {{result}}"), bars=True, w=4, calcs=("sum",))
                     .override_by_regexp(".* failed", [dm.DynamicConfigValue("color", {"mode": "fixed", "fixedColor": "red"})]))
    d = d.with_panel(ts("Unloads by reason", "request, force, idle (idle TTL), evicted (to make room for another "
                        "model)", "short",
                        q(f"sum by (model, reason) ({events(f'model_orchestrator_model_unloads_total{{{N}, {M}}}')})",
                          "{{model}} {{reason}}"), bars=True, w=12, calcs=("sum",)))
    d = d.with_panel(ts("Model failures by code", "Models that went to failed: process_exited (a crash), "
                        "load_timeout, spawn_failed, ...", "short",
                        q(f"sum by (model, code) ({events(f'model_orchestrator_model_failures_total{{{N}, {M}}}')})",
                          "{{model}} {{code}}"), bars=True, w=12, calcs=("sum",),
                        thresholds=steps((None, "green"), (1, "red"))))
    d = d.with_panel(ts("Estimate error (measured − estimated)", "After each load on a GPU: NVML's measurement of "
                        "the model's llama-server minus the estimate admission counted; above 0 the estimate was "
                        "short. The estimator learns the card's CUDA overhead from it (dashed: what it now uses)",
                        "bytes",
                        q(f"max by (model) (model_orchestrator_estimate_error_bytes{{{N}, {M}}})", "{{model}}"),
                        q(f"max by (gpu_name) (model_orchestrator_cuda_overhead_bytes{{{N}}})", "learned overhead {{gpu_name}}"),
                        w=12, minimum=None, calcs=("lastNotNull", "min", "max"))
                     .override_by_regexp("learned overhead .*", [dm.DynamicConfigValue(
                         "custom.lineStyle", {"fill": "dash", "dash": [10, 10]})]))
    d = d.with_panel(ts("Conversations saved / restored at swaps", "Conversation slots (KV cache) saved to disk when "
                        "an idle model was unloaded, and restored at its next load: their next request reuses the "
                        "cached prefix instead of computing it again", "short",
                        q(f"sum by (model) ({events(f'model_orchestrator_kv_slots_saved_total{{{N}, {M}}}')})",
                          "{{model}} saved"),
                        q(f"sum by (model) ({events(f'model_orchestrator_kv_slots_restored_total{{{N}, {M}}}')})",
                          "{{model}} restored"), bars=True, w=12, calcs=("sum",)))

    # ---- chat traffic ---------------------------------------------------------------------------------------
    d = d.with_row(db.Row("Chat traffic (OpenAI API)"))
    d = d.with_panel(ts("Requests/s per model", "OpenAI-API requests proxied to each model, all endpoints", "reqps",
                        q(f"sum by (model) (rate(llamacpp_requests_total{{{N}, {M}}}[{RI}]))", "{{model}}"), w=8))
    chat_failed = events(f'llamacpp_requests_total{{{N}, {M}, status!~"2.."}}')
    d = d.with_panel(ts("Failed chat requests", "Non-2xx answers by model and status, per interval (503: the model "
                        "failed to load or is unloading; 400: llama-server refused the request)", "short",
                        q(f"sum by (model, status) ({chat_failed})",
                          "{{model}} {{status}}"), bars=True, w=8, calcs=("sum",),
                        thresholds=steps((None, "green"), (1, "red"))))
    d = d.with_panel(ts("Latency p50 / p95", "Request to last byte (streams included), per model", "s",
                        q(f"histogram_quantile(0.5, sum by (le, model) (rate(llamacpp_requests_duration_seconds_bucket{{{N}, {M}}}[{RI}])))",
                          "{{model}} p50"),
                        q(f"histogram_quantile(0.95, sum by (le, model) (rate(llamacpp_requests_duration_seconds_bucket{{{N}, {M}}}[{RI}])))",
                          "{{model}} p95"), w=8, calcs=("mean", "max")))
    d = d.with_panel(ts("Generated tokens/s", "Completion tokens per second, from the responses' usage", "tokens/s",
                        q(f"sum by (model) (rate(llamacpp_tokens_generated_total{{{N}, {M}}}[{RI}]))", "{{model}}"),
                        w=8, calcs=("mean", "max")))
    d = d.with_panel(ts("Prompt tokens/s", "Prompt tokens processed per second, from the responses' usage", "tokens/s",
                        q(f"sum by (model) (rate(llamacpp_prompt_tokens_total{{{N}, {M}}}[{RI}]))", "{{model}}"),
                        w=8, calcs=("mean", "max")))
    d = d.with_panel(ts("In flight / queued", "Requests being answered, and requests waiting in their model's "
                        "queue (for its load or its turn)", "short",
                        q(f"sum by (model) (model_orchestrator_requests_in_flight{{{N}, {M}}})", "{{model}} in flight"),
                        q(f"sum by (model) (model_orchestrator_queue_depth{{{N}, {M}}})", "{{model}} queued"),
                        w=8))

    # ---- the queue and the scheduler (dispatcher.py, scheduler.plan) ---------------------------------------------
    d = d.with_row(db.Row("Queue and scheduler"))
    d = d.with_panel(ts("Queue depth", "Requests (and explicit loads) waiting in each model's queue: for its load, "
                        "for its turn while other models are served, or for a free slot", "short",
                        q(f"sum by (model) (model_orchestrator_queue_depth{{{N}, {M}}})", "{{model}}"),
                        w=8, stack=True, calcs=("mean", "max")))
    d = d.with_panel(ts("Queue wait p50 / p99", "How long proxied requests waited before they were sent to "
                        "llama-server (0 when they went at once)", "s",
                        q(f"histogram_quantile(0.5, sum by (le, model) (rate(model_orchestrator_queue_wait_seconds_bucket{{{N}, {M}}}[{RI}])))",
                          "{{model}} p50"),
                        q(f"histogram_quantile(0.99, sum by (le, model) (rate(model_orchestrator_queue_wait_seconds_bucket{{{N}, {M}}}[{RI}])))",
                          "{{model}} p99"), w=8, calcs=("mean", "max")))
    d = d.with_panel(ts("Swaps and their time", "Loads the scheduler started for waiting requests (bars, per "
                        "interval) and how long they took from its decision to the model ready (mean, s)", "short",
                        q(f"sum by (model) ({events(f'model_orchestrator_swaps_total{{{N}, {M}}}')})", "{{model}} swaps"),
                        q(f"sum by (model) (rate(model_orchestrator_swap_duration_seconds_sum{{{N}, {M}}}[{RI}])) / "
                          f"sum by (model) (rate(model_orchestrator_swap_duration_seconds_count{{{N}, {M}}}[{RI}]))",
                          "{{model}} swap s", ref="B"), w=8, calcs=("sum", "max")))
    d = d.with_panel(ts("Left the queue unserved", "Requests refused from the queue, by code: queue_full "
                        "(MODEL_ORCHESTRATOR_MAX_QUEUE), queue_timeout (waited their bound), or their load's refusal",
                        "short", q(f"sum by (model, code) ({events(f'model_orchestrator_queue_refusals_total{{{N}, {M}}}')})",
                                   "{{model}} {{code}}"), bars=True, w=24, h=6, calcs=("sum",),
                        thresholds=steps((None, "green"), (1, "red"))))

    # ---- the sidecar's own API ------------------------------------------------------------------------------
    d = d.with_row(db.Row("Sidecar HTTP API"))
    http_errors = events(f'model_orchestrator_http_requests_total{{{N}, status=~"[45].."}}')
    d = d.with_panel(ts("HTTP errors by route", "4xx and 5xx answers of the sidecar per route and status, per "
                        "interval", "short", q(f"sum by (route, status) ({http_errors})", "{{route}} {{status}}"),
                        bars=True, w=8, calcs=("sum",)))
    d = d.with_panel(ts("HTTP requests by route", "All answers per route", "reqps",
                        q(f"sum by (route) (rate(model_orchestrator_http_requests_total{{{N}}}[{RI}]))", "{{route}}"), w=8))
    d = d.with_panel(ts("HTTP latency p95 by route", "Sidecar answer time per route (loads wait for llama-server)",
                        "s", q(f"histogram_quantile(0.95, sum by (le, route) (rate(model_orchestrator_http_request_duration_seconds_bucket{{{N}}}[{RI}])))",
                               "{{route}}"), w=8, calcs=("mean", "max")))
    return d.build()


def _number_panels(obj: dm.Dashboard) -> None:
    """Stable panel ids in layout order (links to a panel keep working across rebuilds)."""
    for i, p in enumerate(obj.panels or [], start=1):
        p.id_val = i


def render() -> str:
    dash = build()
    _number_panels(dash)
    return json.dumps(dash, cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def configmap(dashboard_json: str) -> str:
    """The dashboard's JSON as a Kubernetes ConfigMap (YAML), for the Grafana helm chart's dashboard sidecar."""
    body = "".join(f"    {line}\n" if line else "\n" for line in dashboard_json.splitlines())
    return ("# Generated by grafana/build_dashboard.py (the same build as grafana/dashboards/model-orchestrator.json):\n"
            "# do not edit. Grafana's dashboard sidecar (grafana helm chart: sidecar.dashboards.enabled) loads it.\n"
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: model-orchestrator-dashboard\n"
            "  namespace: model-orchestrator\n  labels:\n    grafana_dashboard: \"1\"\n"
            "    app.kubernetes.io/name: model-orchestrator\n"
            f"data:\n  model-orchestrator.json: |\n{body}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed JSON instead of writing it")
    args = ap.parse_args(argv)
    text = render()
    outputs = {OUT: text, OUT_CONFIGMAP: configmap(text)}
    if args.check:
        stale = [path for path, content in outputs.items() if not path.exists() or path.read_text() != content]
        for path in outputs:
            print(f"{path}: {'differs from build_dashboard.py; run it' if path in stale else 'up to date'}")
        return 1 if stale else 0
    for path, content in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
