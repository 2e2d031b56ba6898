"""Duel-and-judge at 100 and 1,000 nodes on the real ledger fold: where quality wins, where it breaks.

    python benchmarks/duel_simulation.py [--quick] [--out DIR] [--jobs N]

The benchmark entry of `simulation/duels.py` (the same study as `python simulation/duels.py`):
colluding judges (0, 10, 30, 45%; 60% at N = 100) with canaries on and off, lazy executors and
cherry-picking entries, at N = 100 (3 seeds) and N = 1,000. --quick: N = 100, 1,000 duels, one seed
(about a minute). Target (issue 11): with canaries, 30% colluding judges leave the ordering
good > mid > random intact. Writes duel_simulation.json and duel_simulation.png to --out (default
benchmarks/results/); seeded, so a rerun gives the same figures (timings aside).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: simulation/

from simulation.duels import main

if __name__ == "__main__":
    sys.exit(main())
