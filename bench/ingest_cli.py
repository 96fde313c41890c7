"""The command line the ingest (B) and scale (D) scenarios share: parse, run, print the rows."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

from bench.common import read_rows


def scenario_main(argv: list[str] | None, doc: str, quick_help: str,
                  run: Callable[[bool, Path], Path]) -> int:
    """``--out DIR`` (default out/bench) and ``--quick``; ``run(quick, out)`` writes the JSON.

    Prints one line per row of the JSON ``run`` returns; exits 0 whether or not targets were
    met (the rows say so), non-zero only when the scenario itself failed (raised).
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for row in read_rows(run(args.quick, args.out)):
        ratio = f"{row.ratio:.3f}" if row.ratio is not None else "-"
        print(f"{row.scenario} {row.metric}: {row.value:g} vs {row.baseline} "
              f"(ratio {ratio}, target {row.target}) {'met' if row.met else 'NOT met'}")
    return 0
