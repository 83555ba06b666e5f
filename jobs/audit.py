"""Ray job entry point for audit: ``ray job submit --working-dir . -- python jobs/audit.py -c ...``.

Takes the same ``-c``/``-o`` arguments as ``mlcls``; ``Global.mode`` is fixed to ``audit``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir's code wins

from mlcls_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main([*sys.argv[1:], "-o", "Global.mode=audit"]))
