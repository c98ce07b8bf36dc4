"""Turn the runner's results into the table, the Markdown page and the chart.

Every peer's figure comes with shoal's lead over it: ``x2.0`` means shoal is
twice as good on that row (half the time, or twice the rate), ``x0.50`` that
the peer is twice as good.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

#: (key, part, label, format, better): the rows of the table, in order
ROWS = [
    ("startup_s", "main", "cluster start to first result", "{:.3g} s", "low"),
    ("latency_median_us", "main", "round trip, median", "{:,.0f} us", "low"),
    ("latency_p99_us", "main", "round trip, p99", "{:,.0f} us", "low"),
    ("submit_per_s", "main", "{submit_n:,} submits, then wait", "{:,.0f} /s", "high"),
    ("map_per_s", "main", "map, {map_n:,} trivial items", "{:,.0f} /s", "high"),
    ("small_map_us", "main", "map, {small_map_n:,} trivial items: time, median", "{:,.0f} us",
     "low"),
    ("spin_efficiency", "main", "map, {spin_n:,} x 5 ms: efficiency", "{:.0%}", "high"),
    ("array_median_s", "main", "100 MB array round trip, median", "{:.3g} s", "low"),
    ("stream_per_s", "stream", "generator map, {stream_n:,} items", "{:,.0f} /s", "high"),
    ("stream_client_peak_mb", "stream", "  peak RSS, client", "{:,.0f} MB", "low"),
    ("stream_broker_peak_mb", "stream", "  peak RSS, broker/scheduler", "{:,.0f} MB", "low"),
]
SCALE_ROWS = [
    ("map_per_s", "scale: trivial map, {w} worker{s}", "{:,.0f} /s", "high"),
    ("spin_efficiency", "scale: 5 ms map, {w} worker{s}: efficiency", "{:.0%}", "high"),
]
LABELS = {"shoal": "shoal", "stdlib": "stdlib PPE", "loky": "loky", "dask": "dask",
          "ipyparallel": "ipyparallel", "ray": "ray", "celery": "celery"}
#: how each tool runs each workload (the map's chunking is picked per run: see the notes)
HOW = {
    "shoal": "`shoal.Cluster(n_workers=w)` (which forks its broker and workers, since the "
             "benchmark process has one thread; a notebook kernel spawns them, ~0.17 s); "
             "`client.submit(f, x).result()`; "
             "`shoal.wait(futures)`; `client.map(f, items)` with its default batching, for "
             "every map, generators included.",
    "stdlib": "`concurrent.futures.ProcessPoolExecutor(max_workers=w)` (fork); "
              "`ex.submit`; `ex.map(f, items, chunksize=c)`; the generator through "
              "`ex.map(..., chunksize=10,000)` (which reads its whole input at once). The "
              "scheduler is a thread of the client.",
    "loky": "`loky.get_reusable_executor(max_workers=w)`; as the stdlib otherwise.",
    "dask": "`LocalCluster(n_workers=w, threads_per_worker=1, processes=True)` + `Client`; "
            "`client.submit(f, x, pure=False)`; `distributed.wait`; maps as "
            "`dask.bag.from_sequence(items, npartitions=p).map(f).compute()`; the generator in "
            "chunks of 10,000 through `client.map` (Dask maps no iterators). The scheduler "
            "runs in the client process, so its memory is in the client's figure.",
    "ipyparallel": "`ipp.Cluster(n=w).start_and_connect_sync()`; tasks through the "
                   "`LoadBalancedView` (`apply_async`, `rc.wait`); maps as `DirectView.map` "
                   "(one chunk per engine) or `LoadBalancedView.map(chunksize=c)`; the generator "
                   "in chunks of 10,000 through `LoadBalancedView.imap` (2 per engine in "
                   "flight). Broker memory: the controller and its scheduler processes.",
    "ray": "`ray.init(num_cpus=w)`; `ray.get(f.remote(x))`; `ray.wait`; maps as one remote "
           "call per chunk (Ray's advice for small tasks); the generator in chunks of 10,000. "
           "Broker memory: `gcs_server` + `raylet` (which holds the object store).",
    "celery": "a `celery worker --pool prefork --concurrency w` with a private `redis-server` as "
              "broker and result backend, pickle serializer; `task.delay(x).get()`; "
              "`ResultSet(...).get()`; maps as `task.chunks(items, c).group()`; the generator "
              "the same in chunks of 10,000. Broker memory: `redis-server`.",
}


def lead(shoal: Optional[float], peer: Optional[float], better: str) -> Optional[float]:
    """How many times better shoal is than the peer on this figure (None if unknown)."""
    if shoal is None or peer is None or shoal <= 0 or peer <= 0:
        return None
    return peer / shoal if better == "low" else shoal / peer


def fmt_lead(x: Optional[float]) -> str:
    if x is None:
        return ""
    return f"x{x:.0f}" if x >= 10 else f"x{x:.1f}" if x >= 1 else f"x{x:.2f}"


def _tool_value(results: dict, tool: str, part: str, key: str) -> tuple:
    """(value or None, note): the note says why there is none."""
    entry = results["tools"].get(tool, {})
    if "unavailable" in entry:
        return None, "n/a"
    figures = entry.get(part)
    if figures is None:
        return None, "-"
    if key in figures and figures[key] is not None:
        return figures[key], ""
    if key == "stream_broker_peak_mb" and figures.get("stream_broker"):
        return None, f"({figures['stream_broker']})"
    workload = {"startup_s": "startup", "latency_median_us": "latency",
                "latency_p99_us": "latency", "submit_per_s": "submit", "map_per_s": "map",
                "small_map_us": "small_map",
                "spin_efficiency": "spin", "array_median_s": "array"}.get(key, "stream")
    if workload in figures.get("errors", {}):
        return None, "error"
    return None, "failed" if figures.get("fatal") else "-"


def _scale_value(results: dict, tool: str, w: str, key: str) -> tuple:
    entry = results["tools"].get(tool, {})
    if "unavailable" in entry:
        return None, "n/a"
    point = entry.get("scale", {}).get("scaling", {}).get(w, {})
    if key in point:
        return point[key], ""
    return None, "error" if point else ("failed" if entry.get("scale", {}).get("fatal") else "-")


def _params(results: dict) -> dict:
    """Workload sizes for the labels, from shoal's figures (or any tool's)."""
    params = {"submit_n": 10_000, "map_n": 20_000, "small_map_n": 10, "spin_n": 2_000,
              "stream_n": 1_000_000}
    for entry in results["tools"].values():
        for part in ("main", "stream"):
            for key in params:
                if key in entry.get(part, {}):
                    params[key] = entry[part][key]
    return params


def rows(results: dict) -> list:
    """[(label, [(text, value, lead) per tool])] for every row of the table."""
    tools = list(results["tools"])
    params = _params(results)
    out = []

    def row(label: str, fmt: str, better: str, getter) -> None:
        shoal_value = getter("shoal")[0]
        cells = []
        for tool in tools:
            value, note = getter(tool)
            if value is None:
                cells.append((note, None, None))
                continue
            x = None if tool == "shoal" else lead(shoal_value, value, better)
            cells.append((fmt.format(value), value, x))
        out.append((label, better, cells))

    for key, part, label, fmt, better in ROWS:
        row(label.format(**params), fmt, better,
            lambda tool, part=part, key=key: _tool_value(results, tool, part, key))
    ladder = sorted({w for entry in results["tools"].values()
                     for w in entry.get("scale", {}).get("scaling", {})}, key=int)
    for key, label, fmt, better in SCALE_ROWS:
        for w in ladder:
            row(label.format(w=w, s="" if w == "1" else "s"), fmt, better,
                lambda tool, w=w, key=key: _scale_value(results, tool, w, key))
    return out


# ----------------------------------------------------------------- text
def text(results: dict) -> str:
    tools = list(results["tools"])
    header = ["workload"] + [LABELS[t] for t in tools]
    lines = [header]
    for label, _, cells in rows(results):
        lines.append([label] + [f"{t} {fmt_lead(x)}".strip() for t, _, x in cells])
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join([line[0].ljust(widths[0])]
                             + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]).rstrip())
        if i == 0:
            out.append("-" * len(out[0]))
    out.append("x = shoal's lead over that peer (x2.0: shoal twice as good; x0.50: the peer "
               "twice as good)")
    for tool in tools:
        entry = results["tools"][tool]
        if "unavailable" in entry:
            out.append(f"{tool}: unavailable - {entry['unavailable']}")
    floor = results.get("floor")
    if floor and "tcp_relay" in floor:
        out.append("")
        out.append("distance from the floor:")
        dist = distance_rows(results)
        wa, wb = (max(len(r[i]) for r in dist) for i in (0, 1))
        out.extend(f"  {a.ljust(wa)}  {b.rjust(wb)}  {c}" for a, b, c in dist)
    return "\n".join(out)


# ----------------------------------------------------------------- the floor
def _shoal(results: dict, part: str, key: str) -> Optional[float]:
    return results["tools"].get("shoal", {}).get(part, {}).get(key)


def _transport(results: dict) -> str:
    """What shoal's local cluster used: IPC on one host when the broker offers it."""
    return _shoal(results, "main", "transport") or "tcp"


def distance_rows(results: dict) -> list:
    """[(figure, shoal, floor and shoal's distance)]: how far shoal is from raw pyzmq."""
    floor = results.get("floor", {})
    out = [("figure", "shoal", f"floor (raw pyzmq over {_transport(results).upper()}, as shoal's "
                               "local cluster) -> shoal / floor")]

    def ratio(a: Optional[float], b: Optional[float]) -> str:
        return f"{a / b:.1f}x" if a and b else "?"
    lat = _shoal(results, "main", "latency_median_us")
    p99 = _shoal(results, "main", "latency_p99_us")
    transport = _transport(results)
    relay, direct = floor.get(f"{transport}_relay", {}), floor.get(f"{transport}_direct", {})
    if lat:
        out.append(("round trip, median", f"{lat:,.0f} us",
                    f"relay {relay.get('latency_median_us', 0):,.0f} us -> "
                    f"{ratio(lat, relay.get('latency_median_us'))} (target 1.3x); direct "
                    f"{direct.get('latency_median_us', 0):,.0f} us -> "
                    f"{ratio(lat, direct.get('latency_median_us'))}"))
    if p99:
        out.append(("round trip, p99", f"{p99:,.0f} us",
                    f"relay {relay.get('latency_p99_us', 0):,.0f} us -> "
                    f"{ratio(p99, relay.get('latency_p99_us'))}"))
    rate = _shoal(results, "main", "submit_per_s")
    if rate:
        out.append(("submits, then wait", f"{rate:,.0f} /s",
                    f"relay pipelined {relay.get('pipelined_per_s', 0):,.0f} msg/s, one message "
                    f"each -> floor / shoal {ratio(relay.get('pipelined_per_s'), rate)} "
                    "(below 1: shoal packs several tasks in a message)"))
    arr = _shoal(results, "main", "array_median_s")
    if arr:
        out.append(("100 MB round trip", f"{arr:.3f} s",
                    f"relay {relay.get('big_median_s', 0):.3f} s -> "
                    f"{ratio(arr, relay.get('big_median_s'))}; direct "
                    f"{direct.get('big_median_s', 0):.3f} s -> "
                    f"{ratio(arr, direct.get('big_median_s'))}; copy "
                    f"{floor.get('copy_reuse_median_s', 0) * 1e3:.1f} ms -> "
                    f"{ratio(arr, floor.get('copy_reuse_median_s'))}"))
    return out


def floor_table(floor: dict) -> list:
    out = ["| path | round trip, median | p99 | pipelined | 100 MiB frame round trip, median |",
           "| --- | ---: | ---: | ---: | ---: |"]
    for transport in ("tcp", "ipc"):
        for path in ("direct", "relay"):
            f = floor.get(f"{transport}_{path}")
            if not f:
                continue
            out.append(f"| {transport.upper()} {path} | {f['latency_median_us']:,.0f} µs | "
                       f"{f['latency_p99_us']:,.0f} µs | {f['pipelined_per_s']:,.0f} msg/s | "
                       f"{f['big_median_s']:.3f} s |")
    if "copy_reuse_median_s" in floor:
        out.append("")
        out.append(f"An in-memory copy of 100 MiB takes {floor['copy_reuse_median_s'] * 1e3:.1f} "
                   f"ms into a buffer already in use, {floor['copy_fresh_median_s'] * 1e3:.0f} ms "
                   "into a fresh one (that one pays the page faults too).")
    return out


# ----------------------------------------------------------------- Markdown
def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def markdown(results: dict, chart: Optional[Path]) -> str:
    meta = results["meta"]
    m = meta["machine"]
    tools = list(results["tools"])
    lines = ["# shoal and its peers, side by side", "",
             "Generated by `benchmarks/compare.py`; do not edit by hand, run it again "
             "(see [benchmarks/README.md](../../benchmarks/README.md)).", "",
             f"- **Command:** `{meta['command']}`" + (" (a quick pass: fewer items and "
                                                      "repetitions)" if meta["quick"] else ""),
             f"- **Date:** {meta['date']}; the whole run took {meta.get('wall_s', '?')} s",
             f"- **Machine:** {m.get('cpu', '?')}, {m['cpus']} cores, "
             f"{m.get('memory_gib', '?')} GiB; {m['platform']}; Python {m['python']}",
             f"- **Load average** (1, 5, 15 min) at the start {meta.get('load_start')}, at the "
             f"end {meta.get('load_end')}: other work on the machine makes figures noisy.",
             f"- **Every tool** runs {meta['workers']} worker processes; timed figures are the "
             f"median of {meta['repeats']} repetitions after an untimed warm-up.", ""]
    if meta.get("interrupted"):
        lines += ["**This run was interrupted; the table covers what finished.**", ""]
    lines += ["Each peer's cell: the figure, then **shoal's lead** over that peer: `x2.0` means "
              "shoal is twice as good (half the time, or twice the rate), `x0.50` that the peer is "
              "twice as good.  The best figure of each row is in bold.", ""]
    lines.append("| workload | " + " | ".join(LABELS[t] for t in tools) + " |")
    lines.append("| --- |" + " ---: |" * len(tools))
    for label, better, cells in rows(results):
        values = [v for _, v, _ in cells if v is not None]
        best = (min(values) if better == "low" else max(values)) if values else None
        texts = []
        for t, v, x in cells:
            cell = t.replace(" us", " µs")
            if v is not None and v == best and len(values) > 1:
                cell = f"**{cell}**"
            texts.append(f"{cell} {fmt_lead(x)}".strip())
        lines.append(f"| {label.strip()} | " + " | ".join(texts) + " |")
    lines.append("")
    unavailable = [(t, results["tools"][t]["unavailable"]) for t in tools
                   if "unavailable" in results["tools"][t]]
    problems = []
    for tool in tools:
        for part in ("main", "stream", "scale"):
            figures = results["tools"][tool].get(part, {})
            if figures.get("fatal"):
                problems.append(f"- {tool}, {part}: {_md_escape(figures['fatal'])}")
            for workload, error in figures.get("errors", {}).items():
                problems.append(f"- {tool}, {workload}: {_md_escape(error)}")
            for w, point in figures.get("scaling", {}).items():
                for key in ("map_error", "spin_error"):
                    if key in point:
                        problems.append(f"- {tool}, scale {w}: {_md_escape(point[key])}")
            if figures.get("leftovers"):
                problems.append(f"- {tool}, {part}: the runner had to stop leftover processes: "
                                f"{', '.join(sorted(set(figures['leftovers'])))}")
    if unavailable or problems:
        lines += ["## Could not run", ""]
        lines += [f"- **{t}** is unavailable: {_md_escape(why)}" for t, why in unavailable]
        lines += problems + [""]
    floor = results.get("floor", {})
    if floor.get("tcp_relay"):
        lines += ["## Distance from the floor", "",
                  "How far shoal is from raw pyzmq on this machine, in this run, over "
                  f"{_transport(results).upper()}: the transport shoal's local cluster used (its "
                  "clients and workers reach a broker on the same host over IPC). shoal sends "
                  "large arrays on one host through shared memory, which is how it can beat the "
                  "100 MiB frame.", "",
                  "| figure | shoal | floor, and shoal / floor |", "| --- | ---: | --- |"]
        for a, b, c in distance_rows(results)[1:]:
            lines.append(f"| {a} | {b.replace(' us', ' µs')} | {c.replace(' us', ' µs')} |")
        lines += ["", "## The floor: raw pyzmq", "",
                  f"pyzmq {floor.get('pyzmq')}, libzmq {floor.get('libzmq')}. A DEALER in one "
                  "process and an echo in another, directly (a ROUTER) or through a relay process "
                  "(one ROUTER that forwards frames by routing identity without decoding them; the "
                  "echo is a DEALER behind it, as in shoal's one-port design). Small messages are "
                  f"three frames, {floor.get('message_bytes')} bytes in all; pipelined keeps "
                  f"{floor.get('window')} in flight. The 100 MiB frame goes with `copy=False`.",
                  ""]
        runs = [r for r in results.get("floor_runs", []) if "tcp_relay" in r]
        if len(runs) > 1:
            t = _transport(results)
            seen = ", ".join(f"{r[f'{t}_relay']['latency_median_us']:,.0f} µs" for r in runs)
            lines += ["The floor was measured at the start and at the end of the run; each figure "
                      "below is the better of the two, since other work on the machine can only "
                      f"slow it ({t.upper()} relay round trip, median: {seen}).", ""]
        lines += floor_table(floor) + [""]
    lines += ["## How each tool runs the workloads", "",
              "The task functions are in `benchmarks/bench_tasks.py`, imported by every worker "
              "(so every tool ships them by reference). The 5 ms tasks keep the CPU busy "
              "(a spin, not a sleep). Where a map needs a chunk size, the runner tries the "
              "tool's candidates (one chunk per worker, four per worker) on the trivial map and "
              "keeps the fastest (the map of 10 items also tries one chunk); the 5 ms map uses "
              "four chunks per worker. shoal runs with its "
              "defaults throughout. Start-up times exclude importing the library.", ""]
    for tool in tools:
        lines.append(f"- **{tool}**: {HOW[tool]}")
        main = results["tools"][tool].get("main", {})
        if main.get("map_variants"):
            tried = "; ".join(f"`{k}` {v:,.0f}/s" for k, v in main["map_variants"].items())
            lines.append(f"  Trivial map, tried: {tried}.")
        if main.get("small_map_variants_us"):
            tried = "; ".join(f"`{k}` {v:,.0f} us"
                              for k, v in main["small_map_variants_us"].items())
            lines.append(f"  Map of {main.get('small_map_n', 10)} items, tried: {tried}.")
        versions = {}
        for part in ("main", "stream", "scale"):
            versions.update(results["tools"][tool].get(part, {}).get("versions", {}))
        if versions:
            lines.append("  Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())
                         + ".")
    lines.append("")
    if chart:
        lines += ["## Chart", "", f"![shoal and its peers]({chart.name})", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------- chart
def _compact(v: float) -> str:
    """1.78M, 35.6k, 567, 0.224: short enough to sit on a bar."""
    if v >= 1e6:
        return f"{v / 1e6:.3g}M"
    if v >= 1e4:
        return f"{v / 1e3:.3g}k"
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


COLORS = {"shoal": "#1f77b4", "stdlib": "#7f7f7f", "loky": "#bcbd22", "dask": "#ff7f0e",
          "ipyparallel": "#9467bd", "ray": "#2ca02c", "celery": "#8c564b"}


def chart(results: dict, path: Path) -> Optional[Path]:
    """A PNG of every row as bars (and the scaling as lines); None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tools = list(results["tools"])
    params = _params(results)
    panels = []
    where = {}  # panel title -> (part, key)
    for key, part, label, fmt, better in ROWS:
        values = {t: _tool_value(results, t, part, key)[0] for t in tools}
        unit = fmt.split("}")[-1].strip() or ("%" if "%" in fmt else "")
        scale = 100 if fmt == "{:.0%}" else 1
        title = label.format(**params).strip()
        if title.startswith("peak"):
            title = "generator map: " + title
        title = f"{title}\n({'lower' if better == 'low' else 'higher'} is better)"
        where[title] = (part, key)
        panels.append((title,
                       {t: (v * scale if v is not None else None) for t, v in values.items()},
                       unit if scale == 1 else "%"))
    floor = results.get("floor", {})
    n_panels = len(panels) + 2 + (1 if floor.get("tcp_relay") else 0)
    cols = 4
    rows_n = -(-n_panels // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(cols * 4.6, rows_n * 3.6))
    axes = list(axes.flat)
    for ax, (title, values, unit) in zip(axes, panels):
        names = [t for t in tools]
        heights = [values[t] or 0 for t in names]
        bars = ax.bar(range(len(names)), heights, color=[COLORS[t] for t in names])
        shown = [h for h in heights if h > 0]
        if shown and max(shown) / min(shown) > 30:
            ax.set_yscale("log")
        if ax.get_yscale() == "log":
            ax.set_ylim(top=max(shown) * 4)
        elif shown:
            ax.set_ylim(top=max(shown) * 1.15)
        for bar, t in zip(bars, names):
            v = values[t]
            note = _tool_value(results, t, *where[title])[1] if v is None else ""
            text = (note or "n/a").strip("()") if v is None else _compact(v)
            y = bar.get_height() if v else (min(shown) if shown else 0)
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom",
                        fontsize=7, rotation=0 if v is not None else 90)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([LABELS[t] for t in names], rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    i = len(panels)
    for key, title, scale, unit in (("map_per_s", "scaling: trivial map (higher is better)", 1,
                                     "items/s"),
                                    ("spin_efficiency", "scaling: 5 ms map efficiency "
                                     "(higher is better)", 100, "%")):
        ax = axes[i]
        i += 1
        for t in tools:
            points = results["tools"][t].get("scale", {}).get("scaling", {})
            xs = sorted((int(w) for w in points if key in points[w]))
            if xs:
                ax.plot(xs, [points[str(x)][key] * scale for x in xs], marker="o",
                        color=COLORS[t], label=LABELS[t], linewidth=2.5 if t == "shoal" else 1.2)
        ladder = sorted({int(w) for e in results["tools"].values()
                         for w in e.get("scale", {}).get("scaling", {})})
        if ladder:
            ax.set_xticks(ladder)
            ax.set_xlim(ladder[0] - 0.3, ladder[-1] + 0.3)
        ax.set_xlabel("workers", fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        if key == "map_per_s":
            ax.set_yscale("log")
        ax.legend(fontsize=6)
    if floor.get("tcp_relay"):
        ax = axes[i]
        i += 1
        labels = ["TCP direct", "TCP relay", "IPC direct", "IPC relay", "shoal"]
        vals = [floor.get(k, {}).get("latency_median_us", 0)
                for k in ("tcp_direct", "tcp_relay", "ipc_direct", "ipc_relay")]
        vals.append(_shoal(results, "main", "latency_median_us") or 0)
        bars = ax.bar(range(5), vals, color=["#c7c7c7"] * 4 + [COLORS["shoal"]])
        for bar, v in zip(bars, vals):
            ax.annotate(f"{v:,.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(5))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.set_title("round trip, median: shoal vs the raw pyzmq floor", fontsize=9)
        ax.set_ylabel("us", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes[i:]:
        ax.axis("off")
    meta = results["meta"]
    fig.suptitle(f"shoal and its peers, {meta['workers']} workers each - {meta['date']}, "
                 f"{meta['machine']['cpus']} cores" + (" (quick pass)" if meta["quick"] else ""),
                 fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
