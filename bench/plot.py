"""The fan-out plot: upstream bytes and warm time against node count, layercache vs baseline.

Reads ``<out>/fanout.json`` (written by `bench.fanout`) and draws ``<out>/fanout.png``: left,
layer bytes fetched from upstream (MB, 10^6 bytes) with the unique bytes as a reference line;
right, seconds until every node holds every planned layer. ``python -m bench.plot --out
out/bench``; `bench.run` calls `plot` after the scenarios.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib as mpl

mpl.use("Agg")  # files only: no display on the bed machines
import matplotlib.pyplot as plt  # after mpl.use: the backend is chosen first


def plot(out: Path) -> Path:
    """Draw ``out/fanout.png`` from ``out/fanout.json``; returns the PNG's path.

    Raises:
        FileNotFoundError: there is no ``fanout.json`` in `out`.
        KeyError: the JSON lacks the runs this plot needs.
    """
    data = json.loads((out / "fanout.json").read_text())
    counts = sorted(int(n) for n in data["runs"])
    runs = [data["runs"][str(n)] for n in counts]
    mb = 1e6
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.plot(counts, [r["layercache"]["bytes"]["layers"] / mb for r in runs], "o-",
              label="layercache")
    left.plot(counts, [r["baseline"]["bytes"]["layers"] / mb for r in runs], "s--",
              label="baseline: every node pulls (CRI)")
    left.axhline(data["unique_layer_bytes"] / mb, color="grey", linestyle=":",
                 label="unique layer bytes")
    left.set(xlabel="nodes", ylabel="layer bytes from upstream (MB)",
             title="upstream bytes", xticks=counts)
    right.plot(counts, [r["layercache"]["seconds"] for r in runs], "o-", label="layercache")
    right.plot(counts, [r["baseline"]["seconds"] for r in runs], "s--",
               label="baseline: every node pulls (CRI)")
    right.set(xlabel="nodes", ylabel="seconds until every node holds every layer",
              title="warm time", xticks=counts)
    for ax in (left, right):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    machine = data["machine"]
    cap = data["rate_cap"]["set_bytes_per_second"] / mb
    fig.suptitle(f"Fan-out through one {cap:g} MB/s uplink — {machine['date']}, "
                 f"{machine['cpus']} CPUs ({machine['cpu_model']})", fontsize=10)
    fig.tight_layout()
    path = out / "fanout.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    print(f"wrote {plot(parser.parse_args(argv).out)}")


if __name__ == "__main__":
    main()
