"""report.v1's charts as matplotlib figures: axes, axis labels, titles and legends; PNG bytes out.

Each chart is a function that returns a ``Figure`` (what the tests look at) and :func:`png_bytes` renders
one. Figures are made with matplotlib's object API on an Agg canvas, never through ``pyplot``: pyplot
keeps every figure in a global registry and picks a backend for the whole process, while a report is
drawn on a driver that may be a notebook's or a cluster's, with no display; an Agg canvas per figure
needs neither and leaves the process's backend alone. PNGs carry no ``Software`` entry, so the bytes
depend on the inputs and matplotlib's version only.
"""
from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

DPI = 100
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
ACTION_COLOURS = {"add": "tab:green", "flag": "tab:orange", "drop": "tab:red"}
# the contact sheet's frames: whether dropping the tag was right by the scene world's truth
VERDICT_STYLE = {True: ("tab:green", "right drop: the tag is not in the image's truth"),
                 False: ("tab:red", "wrong drop: the tag is in the image's truth"),
                 None: ("0.6", "not judged: the tag names nothing the world scores")}
SHEET_COLS = 8
MAX_VALUE_LABELS = 24  # vertical bars that get their value written on top


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes. Render a figure once: constrained layout refines itself on every draw, so a
    second render of one figure may place things a pixel apart (a figure made again renders the same)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def bar_chart(title: str, labels: list[str], series: dict[str, list[float]], xlabel: str, ylabel: str,
              horizontal: bool = False, value_fmt: str = "{:.3g}") -> Figure:
    """Grouped bars, one group per label and one bar per series (a legend names them when there are
    several); the value is written at each bar's end."""
    n, k = len(labels), max(1, len(series))
    step = 0.8 / k
    pos = np.arange(n)
    if horizontal:
        fig = _figure(9, 1.2 + 0.22 * n * k)
    else:
        fig = _figure(min(16.0, max(6.0, 1.0 + 0.28 * n * k)), 4.5)
    ax = fig.add_subplot()
    for j, (name, vals) in enumerate(series.items()):
        at = pos - 0.4 + step * (j + 0.5)
        draw = ax.barh if horizontal else ax.bar
        bars = draw(at, vals, step, label=name, color=COLOURS[j % len(COLOURS)])
        if horizontal or n * k <= MAX_VALUE_LABELS:  # side by side, more numbers than that overlap
            ax.bar_label(bars, labels=[value_fmt.format(v) for v in vals], fontsize=7, padding=2)
    if horizontal:
        ax.set_yticks(pos, labels, fontsize=8)
        ax.invert_yaxis()  # the first label on top, as it is read
        ax.margins(x=0.12)
    else:
        ax.set_xticks(pos, labels, rotation=90 if n > 8 else 0, fontsize=8)
        ax.margins(y=0.12)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    return fig


def stage_chart(counts: dict) -> Figure:
    """Tags added, flagged and dropped per stage and reason (``counts``: {stage: {action: {reason: n}}}),
    coloured by action."""
    rows = sorted((stage, action, reason, n) for stage, actions in counts.items()
                  for action, reasons in actions.items() if action in ACTION_COLOURS
                  for reason, n in reasons.items())
    fig = _figure(9, 1.6 + 0.28 * max(1, len(rows)))
    ax = fig.add_subplot()
    pos = np.arange(len(rows))
    bars = ax.barh(pos, [r[3] for r in rows], 0.7, color=[ACTION_COLOURS[r[1]] for r in rows])
    ax.bar_label(bars, fontsize=7, padding=2)
    ax.set_yticks(pos, [f"{s}: {reason}" for s, _, reason, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.12)
    if not rows:
        ax.text(0.5, 0.5, "no tag was added, flagged or dropped", transform=ax.transAxes, ha="center")
    ax.set_xlabel("tags (events)")
    ax.set_ylabel("stage: reason")
    ax.set_title("tags added / flagged / dropped, by stage and reason")
    ax.legend(handles=[Patch(color=c, label=a) for a, c in ACTION_COLOURS.items()], title="action")
    return fig


def long_tail_chart(names: list[str], final: list[int], parse: list[int]) -> Figure:
    return bar_chart("tag long tail: final labels against the parse labels", names,
                     {"final": final, "parse": parse}, xlabel="tag (most frequent final label first)",
                     ylabel="images with the tag", value_fmt="{:d}")


def quality_chart(quality: dict[str, dict[str, float]]) -> Figure:
    """Precision, recall and F1 of each stage's labels against the scene world's truth."""
    stages = list(quality)
    fig = bar_chart("label quality after each stage, against the scene world's truth", stages,
                    {m: [quality[s][m] for s in stages] for m in ("precision", "recall", "f1")},
                    xlabel="labels after", ylabel="score vs truth", value_fmt="{:.2f}")
    fig.axes[0].set_ylim(0, 1.12)
    return fig


def drop_verdict(tag_names: set[str], truth_tags: set[str] | None) -> bool | None:
    """Whether dropping a tag from an image was right: True when none of the world names the tag stands
    for is in the image's truth, False when one is; None when it cannot be judged (no truth for the image,
    or the tag names nothing the world scores, e.g. "big")."""
    if truth_tags is None or not tag_names:
        return None
    return not (tag_names & truth_tags)


def contact_sheet(sheet: dict[str, list], judged: bool) -> Figure:
    """Crops of dropped regions, one block per rule and reason (``sheet[group]``: items
    ``(priority, png, tag name, image id, verdict)``). With truth (``judged``) each crop is framed by its
    :func:`drop_verdict` and a legend says what the colours mean."""
    groups = sorted(sheet.items())
    heights = [math.ceil(len(items) / SHEET_COLS) or 1 for _, items in groups]
    fig = _figure(SHEET_COLS * 1.15, 0.8 + sum(1.45 * h + 0.35 for h in heights))
    if not groups:
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no dropped regions", ha="center", va="center")
        fig.suptitle("dropped regions")
        return fig
    fig.suptitle("dropped regions, by rule and reason" + (" (framed by the scene world's truth)" if judged else ""))
    subs = fig.subfigures(len(groups), 1, height_ratios=heights, squeeze=False)[:, 0]
    for sub, (key, items), h in zip(subs, groups, heights):
        sub.suptitle(f"dropped: {key} ({len(items)} shown)", fontsize=9, x=0.01, ha="left")
        axes = sub.subplots(h, SHEET_COLS, squeeze=False).ravel()
        for ax in axes:
            ax.set_axis_off()
        for ax, (_, png, name, image_id, verdict) in zip(axes, items):
            ax.set_axis_on()
            ax.imshow(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
            ax.set_xticks([])
            ax.set_yticks([])
            colour = VERDICT_STYLE[verdict][0] if judged else "0.3"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4 if judged else 0.8)  # visible around a crop of grass
            ax.set_xlabel(f"{name[:14]}\n{str(image_id)[:14]}", fontsize=6, labelpad=1)
    if judged:
        fig.legend(handles=[Patch(facecolor="none", edgecolor=c, linewidth=3, label=text)
                            for c, text in VERDICT_STYLE.values()], loc="outside lower center", ncols=1, fontsize=8)
    return fig
