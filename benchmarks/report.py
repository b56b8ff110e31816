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


def _fmt(value: Optional[float], spec: str = ".3g", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _ms(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
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
        frac = f"{100 * r.roofline_fraction:.1f}%" if r.roofline_fraction is not None else "-"
        peak = _fmt(r.peak_mem_mb, ".4g", none="n/a") if r.timed else "-"
        body.append([r.shape, str(r.groups), str(r.M), r.mode, r.provider, _ms(r.median_ms),
                     spread, speedup, _fmt(r.tflops), _fmt(r.gbps), frac, _count(r.params), peak,
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
        f"roofline: {roof['peak_tflops']:.4g} TFLOP/s ({roof['tflops_source']}), "
        f"{roof['peak_gbps']:.4g} GB/s ({roof['gbps_source']})",
        f"peak memory: {meta['memory']}",
    ]
    return lines


def format_report(rows: Sequence[Row], meta: dict) -> str:
    parts = header_lines(meta)
    parts += ["", "Detailed results (vs nn.Linear = nn.Linear's median / this median; roofline = "
              "roofline time / measured time):", detailed_table(rows), "",
              "Summary: median time per provider, (speedup vs nn.Linear); ideal = G/2 at the "
              "roofline:", summary_table(rows)]
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


def to_json(rows: Sequence[Row], meta: dict) -> dict:
    return _finite({"schema": JSON_SCHEMA, "meta": meta, "results": [r.to_dict() for r in rows]})


def write_payload(path: str, payload: dict) -> None:
    """Strict JSON (no NaN/Inf), indented; the file is written only once the text is complete."""
    text = json.dumps(_finite(payload), indent=1, allow_nan=False)
    with open(path, "w") as f:
        f.write(text + "\n")


def write_json(path: str, rows: Sequence[Row], meta: dict) -> None:
    write_payload(path, to_json(rows, meta))


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


def _log_tick_label(value: float, digits: Sequence[int]) -> str:
    """``"20"`` for 20 when 2 is in ``digits`` (ticks 1, 2, 5 x 10^k are labelled), else ``""``."""
    if value <= 0:
        return ""
    exponent = math.floor(math.log10(value) + 1e-9)
    mantissa = value / 10 ** exponent
    if round(mantissa) in digits and abs(mantissa - round(mantissa)) < 1e-6:
        return f"{round(mantissa) * 10.0 ** exponent:g}"
    return ""


def write_plots(rows: Sequence[Row], directory: str, dpi: int = 100) -> List[str]:
    """One PNG per shape: median time vs M (log-log), a panel per mode, a line per provider.

    1200 x 750 pixels for two panels, 1800 x 750 for three; the time axis has a tick at every
    decade and at 2 and 5 between (labelled when the panel spans at most three decades, else the
    decades only). An unstable row's time is drawn as a hollow marker.
    """
    try:
        import matplotlib
    except ImportError as err:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    os.makedirs(directory, exist_ok=True)
    providers = _provider_order(rows)
    colours = {name: f"C{i}" for i, name in enumerate(providers)}
    written = []
    for shape in dict.fromkeys(r.shape for r in rows):
        any_unstable = False
        of_shape = [r for r in rows if r.shape == shape]
        modes = list(dict.fromkeys(r.mode for r in of_shape))
        fig, axes = plt.subplots(1, len(modes), figsize=(max(8.0, 6.0 * len(modes)), 7.5),
                                 squeeze=False)
        for ax, mode in zip(axes[0], modes):
            times = []
            for name in providers:
                timed = sorted((r.M, r.median_ms, r.unstable) for r in of_shape
                               if r.mode == mode and r.provider == name and r.timed)
                if timed:
                    Ms_, ts, unstable = zip(*timed)
                    ax.plot(Ms_, ts, marker="o", markersize=6, linewidth=2, label=name,
                            color=colours[name])
                    shaky = [(m, t) for m, t, u in timed if u]
                    if shaky:  # an unstable row's time is drawn hollow: not a result
                        ax.plot(*zip(*shaky), linestyle="none", marker="o", markersize=9,
                                markerfacecolor="white", markeredgewidth=2, color=colours[name])
                        any_unstable = True
                    times += ts
            ax.set_xscale("log")
            ax.set_yscale("log")
            Ms = sorted({r.M for r in of_shape})
            ax.set_xticks(Ms)
            ax.set_xticklabels([str(m) for m in Ms])
            ax.xaxis.set_minor_locator(NullLocator())  # the M values are the x ticks
            decades = math.log10(max(times) / min(times)) if times and min(times) > 0 else 0.0
            minor_digits = (2, 5) if decades <= 3 else ()
            ax.yaxis.set_major_locator(LogLocator(base=10, numticks=30))
            ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2, 3, 4, 5, 6, 7, 8, 9),
                                                  numticks=30))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _log_tick_label(v, (1,))))
            ax.yaxis.set_minor_formatter(FuncFormatter(
                lambda v, _, digits=minor_digits: _log_tick_label(v, digits)))
            ax.set_title(mode, fontsize=15)
            ax.set_xlabel("M (tokens)", fontsize=13)
            ax.tick_params(which="major", labelsize=12, length=6)
            ax.tick_params(which="minor", labelsize=10, length=3)
            ax.grid(True, which="major", alpha=0.45)
            ax.grid(True, which="minor", alpha=0.15)
        axes[0][0].set_ylabel("median time per call (ms)", fontsize=13)
        first = of_shape[0]
        fig.suptitle(f"{shape}: {first.in_features}->{first.out_features}, G={first.groups}, "
                     f"{first.dtype}, {first.env.get('device_name', '')}", fontsize=16)
        handles, labels = axes[0][0].get_legend_handles_labels()
        for ax in axes[0][1:]:
            for h, l in zip(*ax.get_legend_handles_labels()):
                if l not in labels:
                    handles.append(h)
                    labels.append(l)
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=13,
                       frameon=False)
        if any_unstable:
            fig.text(0.99, 0.01, f"hollow: {UNSTABLE}, not a result", ha="right", va="bottom",
                     fontsize=11)
        fig.tight_layout(rect=(0, 0.07, 1, 0.95))
        path = os.path.join(directory, f"{shape}.png")
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        written.append(path)
    return written
