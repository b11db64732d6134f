"""The launcher as a script, for `torchrun ... launch/run.py` and `accelerate launch ... launch/run.py`.

The launcher itself is kvb_dist.run.launcher (its docstring lists the commands); installed,
the same entry is `kvb-dist` and `python -m kvb_dist run`. This file is not installed.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run from a checkout (the usual case for this file): its kvb_dist first, installed or not.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    from kvb_dist.run.launcher import main

    sys.exit(main())
