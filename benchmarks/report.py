"""What a sweep shows: the printed tables, the JSON file and the plots.

Two tables: the detailed one (a row per provider, shape, M and mode: times, speedup, TFLOP/s,
GB/s, roofline fraction, parameters, peak memory, parity) and the summary, one column per
provider headed by its name (``nn.Linear``, ``reference``, ``torch``, ``torch.compile``,
``grouped_mm``, ``triton``), holding the median time and the speedup over ``nn.Linear``.

A row whose measurement stayed unstable (``Row.stable`` False: too wide a spread, or a speedup
above what the roofline allows, in every run) is marked ``UNSTABLE`` wherever its time or
speedup is shown, and the report ends by counting them: such a number is not a result.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

JSON_SCHEMA = "kphi3-bench/1"
UNSTABLE = "UNSTABLE"

OK, PARITY_FAILED, ERROR = "ok", "parity failed", "error"
FAILED_STATUSES = (PARITY_FAILED, ERROR)
NOISY, ABOVE_IDEAL = "noisy", "above the ideal"  # the two kinds of unstable_reason


@dataclass
class Row:
    """One tidy result: a provider on a shape at M tokens in one mode (what the JSON holds).

    The sweep (``sweep.py``) makes them; this module prints, saves and plots them, so it needs
    neither torch nor the kernels (``kphi3-bench plot`` reads a JSON file without them).
    """

    provider: str
    op: str
    shape: str
    family: str
    in_features: int
    out_features: int
    groups: int
    M: int
    dtype: str
    mode: str
    status: str  # "ok", "parity failed", "error", or why it did not run ("needs a GPU", ...)
    parity: str = ""
    parity_rel_err: Optional[float] = None
    parity_tol: Optional[float] = None
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    reps: Optional[int] = None
    speedup_vs_linear: Optional[float] = None
    ideal_speedup_vs_linear: Optional[float] = None
    flops: int = 0
    bytes: int = 0
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    roofline_ms: Optional[float] = None
    roofline_fraction: Optional[float] = None
    roofline_speedup_vs_linear: Optional[float] = None  # nn.Linear's roofline time / this row's
    roofline_note: str = ""  # set when the measured fraction was above 1 (then capped at 1)
    bound: str = ""
    stable: Optional[bool] = None  # timed rows: False when the measurement stayed unstable
    unstable_reason: str = ""
    repeats: Optional[int] = None  # timed rows: how many times the row's providers were timed
    params: int = 0
    peak_mem_mb: Optional[float] = None
    peak_mem_method: str = ""
    error: str = ""
    env: Dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status in FAILED_STATUSES

    @property
    def timed(self) -> bool:
        return self.median_ms is not None

    @property
    def unstable(self) -> bool:
        return self.stable is False

    def to_dict(self) -> dict:
        d = asdict(self)
        env = d.pop("env")
        d.update(env)  # device, device_name, versions and date on every row
        return d


def _ms(value: Optional[float]) -> str:
    return plain(value)


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{plain(n / size)}{unit}"
    return str(n)


def render(headers: Sequence[str], body: Sequence[Sequence[str]], right: Iterable[int] = ()) -> str:
    """A plain-text table with aligned columns (columns in ``right`` right-aligned)."""
    right = set(right)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *body)] if body else \
        [len(h) for h in headers]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in body])


def speedup_text(row: Row) -> str:
    """``2.31x``; ``7.56x UNSTABLE`` when the row's measurement stayed unstable; ``-`` without."""
    if row.speedup_vs_linear is None:
        return f"- {UNSTABLE}" if row.unstable else "-"
    text = f"{row.speedup_vs_linear:.2f}x"
    return f"{text} {UNSTABLE}" if row.unstable else text


def _status_cell(row: Row) -> str:
    if row.status == OK:
        if row.unstable:
            return f"{UNSTABLE}: {row.unstable_reason}; parity {row.parity}"
        return row.parity
    if row.error:
        return f"{row.status.upper()}: {row.error}"
    if row.status == "parity failed":
        return f"PARITY FAILED, not timed: {row.parity}"
    return row.status


def detailed_table(rows: Sequence[Row]) -> str:
    headers = ["shape", "G", "M", "mode", "provider", "median ms", "p20-p80 ms", "vs nn.Linear",
               "TFLOP/s", "GB/s", "roofline", "params", "peak MB", "parity / status"]
    body = []
    for r in rows:
        spread = f"{_ms(r.p20_ms)}-{_ms(r.p80_ms)}" if r.timed else "-"
        speedup = speedup_text(r)
        frac = fmt_percent(r.roofline_fraction) + ("*" if r.roofline_note else "")
        peak = plain(r.peak_mem_mb, 4, none="n/a") if r.timed else "-"
        body.append([r.shape, str(r.groups), str(r.M), r.mode, r.provider, _ms(r.median_ms),
                     spread, speedup, plain(r.tflops), plain(r.gbps), frac, _count(r.params), peak,
                     _status_cell(r)])
    return render(headers, body, right=range(5, 13))


def _provider_order(rows: Sequence[Row]) -> List[str]:
    order: List[str] = []
    for r in rows:
        if r.provider not in order:
            order.append(r.provider)
    return order


def summary_grid(rows: Sequence[Row], providers: Sequence[str], unit: str = " ms"):
    """The summary's cells: one line per (shape, G, M, mode), one cell per provider with its
    median (and speedup vs nn.Linear), or its status when it was not timed."""
    points: Dict[tuple, Dict[str, Row]] = {}
    for r in rows:
        points.setdefault((r.shape, r.groups, r.M, r.mode), {})[r.provider] = r
    body = []
    for (shape, groups, M, mode), by_provider in points.items():
        cells = [shape, str(groups), str(M), mode]
        for name in providers:
            r = by_provider.get(name)
            if r is None:
                cells.append("")
            elif r.timed:
                cell = f"{_ms(r.median_ms)}{unit}"
                if r.speedup_vs_linear is not None and r.provider != "nn.Linear":
                    cell += f" ({r.speedup_vs_linear:.2f}x)"
                if r.unstable:
                    cell += f" {UNSTABLE}"
                cells.append(cell)
            else:
                cells.append(r.status.upper() if r.failed else r.status)
        body.append(cells)
    return body


def summary_table(rows: Sequence[Row]) -> str:
    """One line per shape, M and mode; one column per provider: median ms (speedup vs nn.Linear)."""
    providers = _provider_order(rows)
    headers = ["shape", "G", "M", "mode"] + providers + ["ideal vs nn.Linear"]
    body = [cells + [f"{int(cells[1]) / 2:.1f}x"] for cells in summary_grid(rows, providers)]
    return render(headers, body, right=range(4, 5 + len(providers)))


def unstable_kinds(rows: Sequence[Row]) -> str:
    """How many unstable rows of each kind: ``"1 noisy, 2 above the ideal"`` (``""``: none)."""
    unstable = [r for r in rows if r.timed and r.unstable]
    return ", ".join(f"{sum(kind in r.unstable_reason for r in unstable)} {kind}"
                     for kind in (NOISY, ABOVE_IDEAL)
                     if any(kind in r.unstable_reason for r in unstable))


def unstable_count(rows: Sequence[Row]) -> str:
    """``"2 of 32 timed rows unstable (1 noisy, 1 above the ideal)"``, or ``""`` when none is."""
    timed = [r for r in rows if r.timed]
    unstable = [r for r in timed if r.unstable]
    if not unstable:
        return ""
    return f"{len(unstable)} of {len(timed)} timed rows unstable ({unstable_kinds(rows)})"


def unstable_lines(rows: Sequence[Row], meta: Optional[dict] = None) -> List[str]:
    """The report's closing words on unstable rows (nothing when every row is stable)."""
    count = unstable_count(rows)
    if not count:
        return []
    rule = (meta or {}).get("stability", {}).get("rule", "")
    lines = [f"{count}. A row is {UNSTABLE} when its call times varied too much ({NOISY}) or it "
             f"beat nn.Linear by more than the roofline allows ({ABOVE_IDEAL}) in every run it "
             "was given (usually other work on the machine disturbed it). Its time and speedup "
             "are shown but are not results. To measure them: rerun on an idle machine, or give "
             "each row more time (--max-time) and more repeats (--max-repeats)."]
    if rule:
        lines.append(f"Stability rule: {rule}")
    return lines


def header_lines(meta: dict) -> List[str]:
    env, roof = meta["env"], meta["roofline"]
    lines = [
        f"kphi3-bench on {env['device_name']} | torch {env['torch']}, triton {env['triton']}, "
        f"transformers {env['transformers']} | {env['date']}",
        f"dtype {meta['dtype']}; timing: {meta['timing']}",
        f"roofline: {plain(roof['peak_tflops'], 4)} TFLOP/s ({roof['tflops_source']}), "
        f"{plain(roof['peak_gbps'], 4)} GB/s ({roof['gbps_source']})",
        f"peak memory: {meta['memory']}",
    ]
    return lines


def full_tables(rows: Sequence[Row]) -> List[str]:
    """Every provider and figure: the detailed table, then each provider's median and speedup."""
    return ["Detailed results (vs nn.Linear = nn.Linear's median / this median; roofline = "
            "roofline time / measured time):", detailed_table(rows), "",
            "Every provider: median time (speedup vs nn.Linear); ideal = G/2 at the roofline:",
            summary_table(rows)]


def format_report(rows: Sequence[Row], meta: dict) -> str:
    parts = header_lines(meta) + [""] + full_tables(rows)
    unstable = unstable_lines(rows, meta)
    if unstable:
        parts += [""] + unstable
    return "\n".join(parts)


def _finite(value):
    """JSON has no NaN/Inf: a non-finite float (a parity error of a NaN output) becomes a string."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def to_json(rows: Sequence[Row], meta: dict, complete: bool = True) -> dict:
    """``complete`` is False in the file a running sweep rewrites after each row."""
    return _finite({"schema": JSON_SCHEMA, "complete": complete, "meta": meta,
                    "results": [r.to_dict() for r in rows]})


def write_text(path: str, text: str) -> None:
    """Written to a temporary file that then replaces ``path``, so that an interrupted write
    never leaves half a file (every results file of every command is written so)."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path)


def write_payload(path: str, payload: dict) -> None:
    """Strict JSON (no NaN/Inf), indented, written with ``write_text``."""
    write_text(path, json.dumps(_finite(payload), indent=1, allow_nan=False) + "\n")


def write_json(path: str, rows: Sequence[Row], meta: dict, complete: bool = True) -> None:
    write_payload(path, to_json(rows, meta, complete))


def load_rows(path: str) -> List[dict]:
    """The result rows of a JSON file written by ``write_json`` (or a bare list of rows)."""
    with open(path) as f:
        data = json.load(f)
    return data["results"] if isinstance(data, dict) else data


def rows_from_dicts(dicts: Iterable[dict]) -> List[Row]:
    """``Row`` objects back from their JSON form (the environment keys return to ``env``)."""
    fields = set(Row.__dataclass_fields__)
    rows = []
    for d in dicts:
        known = {k: v for k, v in d.items() if k in fields and k != "env"}
        env = {k: v for k, v in d.items() if k not in fields}
        for key in ("parity_rel_err", "parity_tol"):  # "inf"/"nan" strings back to floats
            if isinstance(known.get(key), str):
                known[key] = float(known[key])
        rows.append(Row(**known, env=env))
    return rows


def markdown_table(headers: Sequence[str], body: Sequence[Sequence[str]],
                   right: Iterable[int] = ()) -> str:
    right = set(right)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)



# ----------------------------------------------------------------------------------------------
# Numbers for people: no exponent notation, a unit that fits the size
# ----------------------------------------------------------------------------------------------


def plain(value: Optional[float], digits: int = 3, none: str = "-") -> str:
    """``value`` with about ``digits`` significant digits and never an exponent: 0.0123, 1.23,
    123, 12345."""
    if value is None:
        return none
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def fmt_time(ms: Optional[float], none: str = "-") -> str:
    """A duration given in ms, in the unit that suits it: ``456 us``, ``1.23 ms``, ``14.8 s``."""
    if ms is None:
        return none
    if ms >= 1000:
        return f"{plain(ms / 1000)} s"
    if ms >= 1:
        return f"{plain(ms)} ms"
    return f"{plain(ms * 1000)} us"


def fmt_percent(fraction: Optional[float]) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


# ----------------------------------------------------------------------------------------------
# The summary printed first: each shape's time as a fraction of nn.Linear's
# ----------------------------------------------------------------------------------------------

SUMMARY_WIDTH = 100  # columns: every line the sweep prints without --table fits
# The providers the summary shows, by the heading it gives them.
SUMMARY_PROVIDERS = (("kernels", "triton"), ("torch", "torch"), ("reference", "reference"))


def _fraction_cell(row: Optional[Row], base: Optional[Row]) -> str:
    """The row's time / nn.Linear's, ``*`` when either was unstable; ``-`` when not timed."""
    if row is None or base is None or not (row.timed and base.timed) or not base.median_ms:
        return "-"
    text = f"{row.median_ms / base.median_ms:.2f}"
    return text + "*" if (row.unstable or base.unstable) else text


def _not_run_notes(rows: Sequence[Row]) -> List[str]:
    """One line per provider that timed no row at all, and why (``needs a GPU``...)."""
    notes = []
    for name in _provider_order(rows):
        own = [r for r in rows if r.provider == name]
        if own and not any(r.timed for r in own):
            why = "; ".join(sorted({r.error or r.status for r in own}))
            notes.append(f"{name}: not run ({why})")
    return notes


def summary_rows(rows: Sequence[Row]) -> List[List[str]]:
    """One line per shape, M and mode: nn.Linear's time, each summary provider's fraction of it,
    the FLOP ratio 2/G."""
    points: Dict[tuple, Dict[str, Row]] = {}
    for r in rows:
        points.setdefault((r.shape, r.groups, r.M, r.mode), {})[r.provider] = r
    shown = [(head, name) for head, name in SUMMARY_PROVIDERS
             if any(r.provider == name for r in rows)]
    body = []
    previous_shape = None
    for (shape, groups, M, mode), by in points.items():
        base = by.get("nn.Linear")
        linear = fmt_time(base.median_ms) if base is not None and base.timed else "-"
        if base is not None and base.unstable:
            linear += "*"
        label = (shape, str(groups)) if shape != previous_shape else ("", "")
        previous_shape = shape
        body.append([*label, str(M), mode, linear]
                    + [_fraction_cell(by.get(name), base) for _, name in shown]
                    + [f"{2 / groups:.2f}"])
    return body


def summary_headers(rows: Sequence[Row]) -> List[str]:
    shown = [head for head, name in SUMMARY_PROVIDERS if any(r.provider == name for r in rows)]
    return ["shape", "G", "M", "mode", "nn.Linear"] + shown + ["2/G"]


def quick_summary(rows: Sequence[Row]) -> str:
    """The answer at a glance: each shape's time with the kernels, the torch backend and the
    plain reference as a fraction of nn.Linear's, beside the FLOP ratio 2/G."""
    headers = summary_headers(rows)
    lines = wrap_lines(["Time per call as a fraction of nn.Linear's (below 1: faster; 2/G: the "
                        "FLOP ratio, the ideal):"])
    lines.append(render(headers, summary_rows(rows), right=[1, 2] + list(range(4, len(headers)))))
    notes = []
    if any(r.unstable for r in rows):
        notes.append(f"*: {UNSTABLE}, the row's timing stayed noisy or beat nn.Linear by more "
                     "than the roofline allows: not a result (--table says why)")
    heading = {name: head for head, name in SUMMARY_PROVIDERS if head != name}
    notes += [f"{heading[n.split(':')[0]]} = {n}" if n.split(":")[0] in heading else n
              for n in _not_run_notes(rows)]
    lines += wrap_lines(notes)
    return "\n".join(lines)


def wrap_lines(paragraphs: Sequence[str], width: int = SUMMARY_WIDTH) -> List[str]:
    """Each paragraph wrapped to ``width`` columns, continuation lines indented."""
    import textwrap

    out: List[str] = []
    for p in paragraphs:
        out += textwrap.wrap(p, width, subsequent_indent="  ", break_on_hyphens=False) or [""]
    return out


def format_summary_report(rows: Sequence[Row], meta: dict, tables: bool = False) -> str:
    """What the sweep prints: the header and the summary (within 100 columns), then, with
    ``tables``, the full tables (every provider and figure, as in the JSON)."""
    head = header_lines(meta)
    if not tables:  # the machine and the dtype; how it was timed is in the JSON and --table
        head = [head[0], f"dtype {meta['dtype']}; --table prints every provider's time, spread, "
                         "TFLOP/s, roofline fraction, memory and parity"]
    parts = wrap_lines(head) + ["", quick_summary(rows)]
    if tables:
        parts += [""] + full_tables(rows)
    unstable = unstable_lines(rows, meta)
    if unstable:
        parts += [""] + wrap_lines(unstable if tables else unstable[:1])
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# Plots: the speed-up over nn.Linear against M, one figure per shape family
# ----------------------------------------------------------------------------------------------

IDEAL_STYLE = dict(color="black", linestyle=":", linewidth=1.6)
PARITY_STYLE = dict(color="0.45", linestyle="--", linewidth=1.2)
NICE_TICKS = (0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 30, 50, 100)


def speedup_points(rows: Sequence[Row], shape: str, mode: str, provider: str):
    """(M, speed-up over nn.Linear, unstable) of one line, sorted by M; a speed-up is unstable
    when the row's timing or nn.Linear's was."""
    shaky_base = {r.M for r in rows if r.shape == shape and r.mode == mode
                  and r.provider == "nn.Linear" and r.unstable}
    return sorted((r.M, r.speedup_vs_linear, r.unstable or r.M in shaky_base) for r in rows
                  if r.shape == shape and r.mode == mode and r.provider == provider
                  and r.speedup_vs_linear is not None)


def _y_axis(ax, values: Sequence[float]) -> None:
    """Log scale when the values span more than a decade, linear otherwise; ticks at round
    numbers either way, at least three of them, labelled ``0.5x``, ``2x``."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

    lo, hi = min(values), max(values)
    if hi / lo > 10:
        ax.set_yscale("log")
        lo, hi = lo / 1.4, hi * 1.4
        ticks = [t for t in NICE_TICKS if lo <= t <= hi]
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_minor_locator(NullLocator())
    else:
        pad = 0.08 * (hi - lo) or 0.1
        lo, hi = max(0.0, lo - pad), hi + pad
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10], min_n_ticks=3))
    ax.set_ylim(lo, hi)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{plain(v, 2)}x"))


def _x_axis(ax, Ms: Sequence[int]) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(list(Ms)))
    ax.xaxis.set_minor_locator(NullLocator())  # the M values are the x ticks
    ax.set_xticklabels([str(m) for m in Ms])
    if len(Ms) > 1:
        ax.set_xlim(Ms[0] / 1.6, Ms[-1] * 1.6)
    else:
        ax.set_xlim(Ms[0] / 2, Ms[0] * 2)


def _panel(ax, rows: Sequence[Row], shape: str, mode: str, providers: Sequence[str],
           colours: Dict[str, str]) -> bool:
    """One shape and mode: a line per provider, nn.Linear (1x) and the FLOP ideal (G/2) drawn.
    True when a point was unstable (drawn hollow)."""
    of_shape = [r for r in rows if r.shape == shape]
    groups = of_shape[0].groups
    ideal = groups / 2
    values = [1.0, ideal]
    any_unstable = False
    for name in providers:
        points = speedup_points(rows, shape, mode, name)
        if not points:
            continue
        Ms, speedups, unstable = zip(*points)
        ax.plot(Ms, speedups, marker="o", markersize=6, linewidth=2, label=name,
                color=colours[name])
        shaky = [(m, s) for m, s, u in points if u]
        if shaky:  # an unstable row's speed-up is drawn hollow: not a result
            ax.plot(*zip(*shaky), linestyle="none", marker="o", markersize=9,
                    markerfacecolor="white", markeredgewidth=2, color=colours[name])
            any_unstable = True
        values += speedups
    ax.axhline(1.0, label="nn.Linear (1x)", **PARITY_STYLE)
    ax.axhline(ideal, label="FLOP ideal: G/2 (2/G of the time)", **IDEAL_STYLE)
    _y_axis(ax, values)
    _x_axis(ax, sorted({r.M for r in of_shape}))
    ax.set_title(f"{shape} (G = {groups}), {mode}", fontsize=12)
    ax.tick_params(labelsize=10)
    ax.grid(True, which="major", alpha=0.35)
    return any_unstable


def family_figure(rows: Sequence[Row], family: str):
    """The figure of one shape family: a panel per shape (columns) and mode (rows)."""
    import matplotlib.pyplot as plt

    of_family = [r for r in rows if r.family == family]
    shapes_ = list(dict.fromkeys(r.shape for r in of_family))
    modes = list(dict.fromkeys(r.mode for r in of_family))
    providers = [p for p in _provider_order(of_family) if p != "nn.Linear"]
    colours = {name: f"C{i}" for i, name in enumerate(providers)}
    fig, axes = plt.subplots(len(modes), len(shapes_), squeeze=False,
                             figsize=(max(7.0, 4.0 * len(shapes_)), 1.9 + 3.3 * len(modes)))
    any_unstable = False
    for i, mode in enumerate(modes):
        for j, shape in enumerate(shapes_):
            any_unstable |= _panel(axes[i][j], of_family, shape, mode, providers, colours)
        axes[i][0].set_ylabel("speed-up over nn.Linear", fontsize=11)
    for ax in axes[-1]:
        ax.set_xlabel("M (tokens)", fontsize=11)
    first = of_family[0]
    fig.suptitle(f"{family}: speed-up over nn.Linear ({first.dtype}, "
                 f"{first.env.get('device_name', '')})", fontsize=14)
    _legend_and_notes(fig, axes, of_family, any_unstable)
    return fig


def _legend_and_notes(fig, axes, rows: Sequence[Row], any_unstable: bool) -> None:
    """The legend (every provider that ran, and the two reference lines) above the notes (hollow
    points, providers that did not run), both below the panels; measured so none overlaps."""
    handles, labels = [], []
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    notes = ([f"hollow points: {UNSTABLE} rows (noisy or implausible timing), not results"]
             if any_unstable else []) + _not_run_notes(rows)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    height = fig.bbox.height
    pad = 6.0  # pixels between the notes, the legend and the panels
    top = pad / height
    if notes:
        text = fig.text(0.5, top, "\n".join(notes), ha="center", va="bottom", fontsize=10,
                        wrap=True)
        top = (text.get_window_extent(renderer).y1 + pad) / height
    legend = fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, top),
                        ncol=min(len(labels), 4), fontsize=10, frameon=False)
    top = (legend.get_window_extent(renderer).y1 + pad) / height
    fig.tight_layout(rect=(0, top, 1, 0.95))


def write_plots(rows: Sequence[Row], directory: str, dpi: int = 150) -> List[str]:
    """One PNG per shape family (``<family>.png``): the speed-up over nn.Linear against M, a
    panel per shape and mode, a line per provider that ran, with nn.Linear (1x) and the FLOP
    ideal G/2 drawn; unstable rows hollow; a note names the providers that did not run."""
    try:
        import matplotlib
    except ImportError as err:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    written = []
    for family in dict.fromkeys(r.family for r in rows):
        if not any(r.speedup_vs_linear is not None for r in rows if r.family == family):
            continue  # nothing timed against nn.Linear: nothing to draw
        fig = family_figure(rows, family)
        path = os.path.join(directory, f"{family}.png")
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        written.append(path)
    return written
