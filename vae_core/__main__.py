import os
import sys

# An idle OpenMP thread polls 300,000 rounds before it sleeps. Two torch processes on one machine (a
# sweep's workers, several CLI runs, a run beside the dashboard) then burn each other's cores: 100 steps
# beside another 2-thread run took 23 s instead of 4 (docs/performance.md, the test suite's wall time),
# and alone it makes no difference. It counts only if set before torch loads; a user's value wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from .cli import main  # noqa: E402

sys.exit(main())
