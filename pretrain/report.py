"""Pictures of runs without W&B: `python -m pretrain.report RUN_DIR [RUN_DIR ...] [--out DIR] [--x tokens]`.

The drawing lives in pretrain/monitor/report.py; this is the command-line name users type.
"""

import sys

from pretrain.monitor.report import main

if __name__ == "__main__":
    sys.exit(main())
