#!/usr/bin/env python3
"""Plots of `tdsc-lab bench-policies` output (summary.csv, util.csv) into PNGs.

usage: plot-bench-policies.py DIR   (writes DIR/util-<load>.png, DIR/per-node.png, DIR/reply.png)
"""
import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

d = sys.argv[1]
summary = list(csv.DictReader(open(f"{d}/summary.csv")))
util = defaultdict(list)
for r in csv.DictReader(open(f"{d}/util.csv")):
    util[(r["policy"], r["load"])].append(r)
policies = list(dict.fromkeys(r["policy"] for r in summary))
loads = list(dict.fromkeys(r["load"] for r in summary))

def rolling(v, n=10):
    """Mean over the last n samples (1 s at the 100 ms sampling period)."""
    out = []
    for i in range(len(v)):
        w = v[max(0, i - n + 1) : i + 1]
        out.append(sum(w) / len(w))
    return out


# Fig. 8/9 of the paper: min, mean and max utilisation across nodes over time. Samples are
# instantaneous (busy slots at one instant), so each curve is shown as a 1-s rolling mean.
for load in loads:
    runs = [p for p in policies if (p, load) in util]
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 1.6 * len(runs)), sharex=True)
    if len(runs) == 1:
        axes = [axes]
    for ax, p in zip(axes, runs):
        rows = util[(p, load)]
        t = [float(r["t"]) for r in rows]
        lo = rolling([float(r["min"]) for r in rows])
        mean = rolling([float(r["mean"]) for r in rows])
        hi = rolling([float(r["max"]) for r in rows])
        ax.fill_between(t, lo, hi, alpha=0.25, color="tab:blue", step="mid")
        ax.plot(t, hi, lw=0.8, color="tab:red", label="max")
        ax.plot(t, mean, lw=0.8, color="black", label="mean")
        ax.plot(t, lo, lw=0.8, color="tab:green", label="min")
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel(p, rotation=0, ha="right", fontsize=8)
    axes[0].legend(loc="upper right", fontsize=7, ncol=3)
    axes[-1].set_xlabel("seconds")
    fig.suptitle(f"node utilisation (busy slots / slots), min/mean/max across nodes (1-s rolling), load {float(load):.0%}")
    fig.tight_layout()
    fig.savefig(f"{d}/util-{float(load):.0%}.png".replace("%", "pct"), dpi=90)
    plt.close(fig)

# Replies per node, per policy and load.
fig, axes = plt.subplots(1, len(loads), figsize=(5 * len(loads), 4), squeeze=False)
for ax, load in zip(axes[0], loads):
    rows = [r for r in summary if r["load"] == load]
    for i, r in enumerate(rows):
        counts = [int(x) for x in r["per_node"].split()]
        total = sum(counts) or 1
        bottom = 0
        for j, c in enumerate(counts):
            ax.bar(i, c / total, bottom=bottom, color=f"C{j}", edgecolor="white")
            bottom += c / total
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["policy"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.axhline(1 / 3, color="grey", lw=0.5)
    ax.axhline(2 / 3, color="grey", lw=0.5)
    ax.set_title(f"share of connections per node, load {float(load):.0%}")
fig.tight_layout()
fig.savefig(f"{d}/per-node.png", dpi=90)
plt.close(fig)

# Mean and p99 reply time.
fig, axes = plt.subplots(1, len(loads), figsize=(5 * len(loads), 4), squeeze=False)
for ax, load in zip(axes[0], loads):
    rows = [r for r in summary if r["load"] == load]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [float(r["reply_mean"]) for r in rows], 0.4, label="mean")
    ax.bar([i + 0.2 for i in x], [float(r["reply_p99"]) for r in rows], 0.4, label="p99")
    ax.set_xticks(list(x))
    ax.set_xticklabels([r["policy"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("reply time, ms")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"reply time (request sent -> first byte), load {float(load):.0%}")
fig.tight_layout()
fig.savefig(f"{d}/reply.png", dpi=90)
plt.close(fig)
print(f"plots written to {d}")
