"""The human side of a results directory: PNG plots and an index.html that links everything.

Division of labour: `testbed.experiment.results` computes the contract files (summary.json,
timeseries.csv, events.jsonl); this module only draws them. Plots (matplotlib, Agg backend,
no display needed):
- `timeline.png`: throughput (with the prediction of the plan in force) and latency p50/p99
  over the measured window, fault windows shaded from `fault.injected` to `fault.healed`
  (instant faults such as node.restart are a line), re-plans marked;
- `hosts.png`: per-host CPU (cores) and memory (MiB) when timeseries.csv has them;
- `plan.png`: the plan as stages on hosts: a box per stage (host, segments, compute ms), an
  arrow per hop (transfer ms), the bottleneck in red; the last plan deployed as well when the
  controller re-planned during the run.
`index.html` has the summary table, the faults with their timings, the links with the
mechanism that served each, the plots, and links to every file of the directory.
"""

from __future__ import annotations

import csv
import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

from testbed.control import events as ev

FILES = ("summary.json", "requests.csv", "timeseries.csv", "events.jsonl", "plan.json")
COLOURS = {"node": "tab:red", "link": "tab:blue", "io": "tab:orange"}
STAGES_PER_ROW = 6


def write_report(out_dir: Path, summary: dict[str, Any], events: list[dict[str, Any]],
                 timeseries_path: Path) -> None:
    """Write the plots and index.html into `out_dir` (which holds the other result files)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = _read_timeseries(timeseries_path)
    start = float(summary.get("window", {}).get("start_unix", 0.0))
    duration = float(summary.get("window", {}).get("duration_s", len(rows)))
    windows = fault_windows(events, start, duration)
    images = []
    if rows:
        _plot_timeline(out_dir / "timeline.png", summary, events, rows, windows, start)
        images.append("timeline.png")
        if _plot_hosts(out_dir / "hosts.png", rows, windows):
            images.append("hosts.png")
    plans = _plans(summary, events)
    if plans:
        _plot_plans(out_dir / "plan.png", plans)
        images.append("plan.png")
    (out_dir / "index.html").write_text(_index(out_dir, summary, images))


def _read_timeseries(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with path.open() as handle:
        return [{key: float(value) for key, value in row.items() if value not in ("", None)}
                for row in csv.DictReader(handle)]


def fault_windows(events: list[dict[str, Any]], start: float,
                  duration: float) -> list[dict[str, Any]]:
    """Each injected fault as {action, target, begin, end} in seconds of the measured window;
    `end` is None for an instant fault (nothing to heal), the window's end for a fault still
    in force when it closed. A heal is matched by step number (or action and target)."""
    windows = []
    for index, event in enumerate(events):
        if event.get("type") != ev.FAULT_INJECTED or event.get("error"):
            continue
        healed = next((e for e in events[index + 1:] if _heals(e, event)), None)
        instant = healed is None and not _has_heal(event.get("action", ""))
        end = None if instant else (duration if healed is None
                                    else min(duration, healed["t"] - start))
        windows.append({"action": event.get("action", "?"), "target": event.get("target"),
                        "begin": event["t"] - start, "end": end})
    return windows


def _heals(other: dict[str, Any], injected: dict[str, Any]) -> bool:
    if other.get("type") != ev.FAULT_HEALED:
        return False
    if "step" in injected:
        return other.get("step") == injected["step"]
    return (other.get("action"), other.get("target")) == (injected.get("action"),
                                                          injected.get("target"))


def _has_heal(action: str) -> bool:
    from testbed.experiment.faults import FAULTS

    kind = FAULTS.get(action)
    return kind is not None and kind.heal is not None


def _target_text(target: Any) -> str:
    """edge1, edge1-s1 (a link), or edge1,edge2 | edge3 (a partition's groups)."""
    if target is None or isinstance(target, str):
        return target or ""
    if all(isinstance(item, list) for item in target):
        return " | ".join(",".join(map(str, group)) for group in target)
    return "-".join(map(str, target))


def _shade(axes: Axes, windows: list[dict[str, Any]], label: bool) -> None:
    for window in windows:
        colour = COLOURS.get(window["action"].split(".")[0], "tab:gray")
        if window["end"] is None:
            axes.axvline(window["begin"], color=colour, linestyle="--", linewidth=1, alpha=0.8)
        else:
            axes.axvspan(window["begin"], max(window["end"], window["begin"] + 0.1),
                         color=colour, alpha=0.15, linewidth=0)
        if label:
            axes.annotate(f"{window['action']} {_target_text(window['target'])}",
                          (window["begin"], 1.0), xycoords=("data", "axes fraction"),
                          rotation=90, va="top", ha="right", fontsize=7, color=colour)


def _plot_timeline(path: Path, summary: dict[str, Any], events: list[dict[str, Any]],
                   rows: list[dict[str, float]], windows: list[dict[str, Any]],
                   start: float) -> None:
    t = [row["t_s"] + 0.5 for row in rows]   # a bucket's value at its middle
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    top.plot(t, [row.get("throughput_rps", 0.0) for row in rows], color="black",
             label="throughput (1 s)")
    steps_t, steps_rps = _predicted_steps(summary, events, start, t[-1] + 0.5)
    top.step(steps_t, steps_rps, where="post", color="tab:green", linestyle=":",
             label="predicted (plan in force)")
    for event in events:
        if event.get("type") == ev.PLAN_DEPLOYED and 0 < event["t"] - start < t[-1] + 0.5:
            top.axvline(event["t"] - start, color="tab:green", linewidth=0.8, alpha=0.6)
    top.set_ylabel("requests / s")
    top.set_ylim(bottom=0)
    top.legend(loc="lower left", fontsize=8)
    _shade(top, windows, label=True)
    bottom.plot(t, [row.get("p50_ms", 0.0) for row in rows], label="p50")
    bottom.plot(t, [row.get("p99_ms", 0.0) for row in rows], label="p99")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("seconds into the measured window")
    bottom.set_ylim(bottom=0)
    bottom.legend(loc="upper left", fontsize=8)
    _shade(bottom, windows, label=False)
    figure.suptitle(f"{summary.get('scenario', '')}: throughput and latency")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _predicted_steps(summary: dict[str, Any], events: list[dict[str, Any]], start: float,
                     end: float) -> tuple[list[float], list[float]]:
    times, values = [0.0], [float(summary.get("predicted_throughput_rps", 0.0))]
    for event in events:
        offset = event["t"] - start
        if event.get("type") == ev.PLAN_DEPLOYED and event.get("predicted_throughput_rps"):
            if offset <= 0:
                values[0] = float(event["predicted_throughput_rps"])
            elif offset < end:
                times.append(offset)
                values.append(float(event["predicted_throughput_rps"]))
    times.append(end)
    values.append(values[-1])
    return times, values


def _plot_hosts(path: Path, rows: list[dict[str, float]],
                windows: list[dict[str, Any]]) -> bool:
    hosts = sorted({key[:-4] for row in rows for key in row if key.endswith("_cpu")})
    if not hosts:
        return False
    t = [row["t_s"] + 0.5 for row in rows]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    for host in hosts:
        top.plot(t, [row.get(f"{host}_cpu", float("nan")) for row in rows], label=host)
        bottom.plot(t, [row.get(f"{host}_mem_mb", float("nan")) for row in rows], label=host)
    top.set_ylabel("CPU (cores)")
    bottom.set_ylabel("memory (MiB)")
    bottom.set_xlabel("seconds into the measured window")
    top.legend(loc="upper left", fontsize=7, ncol=max(1, len(hosts) // 6))
    for axes in (top, bottom):
        axes.set_ylim(bottom=0)
        _shade(axes, windows, label=axes is top)
    figure.suptitle("per-host CPU and memory (from their cgroups)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def _plans(summary: dict[str, Any], events: list[dict[str, Any]]) -> list[tuple[str, dict]]:
    """The planned deployment, and the last one deployed if the controller re-planned."""
    plans = []
    if summary.get("plan", {}).get("stages"):
        plans.append(("planned", summary["plan"]))
    deployed = [e for e in events if e.get("type") == ev.PLAN_DEPLOYED and e.get("plan")]
    if deployed:
        last = deployed[-1]
        if not plans or last["plan"].get("stages") != plans[0][1].get("stages"):
            plans.append((f"last deployed (epoch {last.get('epoch')})", last["plan"]))
    return plans


def first_pipeline(plan: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The stages of a plan's first pipeline, and a note naming the others' hosts when it
    runs several side by side (they are drawn as one: the same model cut for each)."""
    chains = plan.get("chains") or [len(plan["stages"])]
    stages = plan["stages"][:chains[0]]
    if len(chains) == 1:
        return stages, ""
    others = [s["node"] for s in plan["stages"][chains[0]:]]
    shown = ", ".join(others[:6]) + (", ..." if len(others) > 6 else "")
    return stages, f"; 1 of {len(chains)} pipelines side by side (the others on {shown})"


def _plot_plans(path: Path, plans: list[tuple[str, dict[str, Any]]]) -> None:
    rows_per_plan = [1 + (len(first_pipeline(plan)[0]) + 1) // STAGES_PER_ROW
                     for _, plan in plans]
    figure, axes_list = plt.subplots(len(plans), 1, squeeze=False, figsize=(
        2.0 * (STAGES_PER_ROW + 1), sum(1.7 * r + 0.6 for r in rows_per_plan)),
        gridspec_kw={"height_ratios": rows_per_plan})
    for (title, plan), axes in zip(plans, axes_list[:, 0]):
        _draw_plan(axes, title, plan)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _draw_plan(axes: Axes, title: str, plan: dict[str, Any]) -> None:
    """Boxes: the dispatcher, each stage, the dispatcher's sink; laid out in rows of
    STAGES_PER_ROW + 1, each hop an arrow labelled with its transfer time."""
    stages, others = first_pipeline(plan)
    hops = [s.get("in_ms") for s in stages] + [plan.get("out_ms")]
    times = [s.get("compute_ms") or 0.0 for s in stages] + [h or 0.0 for h in hops]
    bottleneck = max(times) if times else 0.0
    boxes = [("dispatcher", "source", None)]
    for i, stage in enumerate(stages):
        first, end = stage["segments"]
        boxes.append((f"stage {i}: {stage['node']}", f"segments {first}-{end - 1}",
                      stage.get("compute_ms")))
    boxes.append(("dispatcher", "sink", None))
    per_row = STAGES_PER_ROW + 1
    rows = (len(boxes) + per_row - 1) // per_row

    def centre(index: int) -> tuple[float, float]:
        return 2.0 * (index % per_row) + 0.8, -1.7 * (index // per_row)

    for index, (name, what, compute) in enumerate(boxes):
        x, y = centre(index)
        red = compute is not None and bottleneck > 0 and compute >= bottleneck - 1e-9
        axes.add_patch(FancyBboxPatch((x - 0.7, y - 0.45), 1.4, 0.9,
                                      boxstyle="round,pad=0.03", linewidth=1.5,
                                      edgecolor="tab:red" if red else "black",
                                      facecolor="#fde0dd" if red else
                                      ("#eeeeee" if compute is None else "#e0ecf8")))
        text = f"{name}\n{what}" + ("" if compute is None else f"\n{compute:.1f} ms")
        axes.text(x, y, text, ha="center", va="center", fontsize=7.5)
    for index, hop in enumerate(hops):
        (x0, y0), (x1, y1) = centre(index), centre(index + 1)
        same_row = y0 == y1
        start = (x0 + 0.7, y0) if same_row else (x0, y0 - 0.45)
        end = (x1 - 0.7, y1) if same_row else (x1, y1 + 0.45)
        red = hop is not None and bottleneck > 0 and hop >= bottleneck - 1e-9
        axes.annotate("", xy=end, xytext=start, arrowprops={
            "arrowstyle": "->", "color": "tab:red" if red else "black", "linewidth": 1.2})
        label = "" if hop is None else f"{hop:.1f} ms"
        axes.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, label,
                  ha="center", va="bottom", fontsize=7, color="tab:red" if red else "black")
    axes.set_xlim(-0.1, 2.0 * per_row - 0.3)
    axes.set_ylim(-1.7 * (rows - 1) - 0.7, 0.7)
    axes.set_aspect("equal")
    axes.axis("off")
    bottleneck_text = plan.get("bottleneck_ms")
    axes.set_title(f"{title}: {len(stages)} stage{'' if len(stages) == 1 else 's'}{others}"
                   + (f", bottleneck {bottleneck_text:.1f} ms" if bottleneck_text else "")
                   + (f" ({plan.get('algorithm')})" if plan.get("algorithm") else ""),
                   fontsize=10)


# -- index.html -------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, (list, dict)):
        value = _target_text(value) if isinstance(value, list) else str(value)
    return f"<td>{html.escape('' if value is None else str(value))}</td>"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _index(out_dir: Path, summary: dict[str, Any], images: list[str]) -> str:
    slo = summary.get("slo", {})
    passed = slo.get("passed")
    requests = summary.get("requests", {})
    latency = summary.get("latency_ms", {})
    overview = _table(["measure", "value"], [
        ["scenario", summary.get("scenario")], ["backend", summary.get("backend")],
        ["throughput (rps)", summary.get("throughput_rps")],
        ["predicted (rps)", summary.get("predicted_throughput_rps")],
        ["measured / predicted", summary.get("throughput_ratio")],
        *[["stage dearer than its model", line]
          for line in summary.get("cost_check", {}).get("dearer", [])],
        *[[f"latency {q} (ms)", latency.get(q)] for q in ("p50", "p95", "p99", "mean")
          if q in latency],
        *[[f"requests {k}", v] for k, v in requests.items()],
        ["SLO", "passed" if passed else "FAILED"],
        *[["violation", v] for v in slo.get("violations", [])],
        *[["invalid", v] for v in summary.get("invalid", [])],
    ])
    faults = summary.get("faults", [])
    fault_table = _table(["action", "target", "at (s)", "late (ms)", "detected (s)",
                          "recovered (s, 90% of the plan)",
                          "recovered (s, 90% of the rate before)"],
                         [[f.get("action"), f.get("target"), f.get("at_s"), f.get("late_ms"),
                           f.get("detected_s"), f.get("recovered_s"),
                           f.get("recovered_rel_s")] for f in faults]) \
        if faults else "<p>No faults in this scenario.</p>"
    links = summary.get("links", [])
    link_table = _table(["link", "Mbit/s", "delay (ms)", "jitter (ms)", "loss (%)",
                         "bandwidth by", "delay by", "loss by"],
                        [[row.get("link"), row.get("bandwidth_mbps"), row.get("delay_ms"),
                          row.get("jitter_ms"), row.get("loss_pct"), row.get("bandwidth"),
                          row.get("delay"), row.get("loss")] for row in links]) \
        if links else ""
    files = [name for name in FILES if (out_dir / name).exists()] + images
    file_list = "".join(f'<li><a href="{html.escape(n)}">{html.escape(n)}</a></li>'
                        for n in files)
    figures = "".join(f'<p><img src="{html.escape(n)}" alt="{html.escape(n)}"></p>'
                      for n in images)
    verdict = "passed" if passed else "failed"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(str(summary.get("scenario", "run")))}
</title><style>
body {{font-family: sans-serif; margin: 2em; max-width: 1200px}}
table {{border-collapse: collapse; margin-bottom: 1.5em}}
td, th {{border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left}}
.passed {{color: #1a7f37}} .failed {{color: #cf222e}}
img {{max-width: 100%}}
</style></head><body>
<h1>{html.escape(str(summary.get("scenario", "")))}: <span class="{verdict}">SLO
{verdict}</span></h1>
<h2>Summary</h2>{overview}
<h2>Faults</h2>{fault_table}
{"<h2>Links</h2>" + link_table if link_table else ""}
<h2>Plots</h2>{figures}
<h2>Files</h2><ul>{file_list}</ul>
</body></html>
"""
