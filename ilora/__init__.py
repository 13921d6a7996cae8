"""ilora-bench: federated LoRA fine-tuning, reproduced and compared.

Importing the package sets the suite's OpenMP defaults before torch is loaded, unless the user chose
either variable: ``OMP_WAIT_POLICY=PASSIVE`` with ``GOMP_SPINCOUNT=1000``, so that an idle OpenMP thread
spins only briefly before it sleeps. libgomp's own default spins about 300,000 times, which made a run
sharing its cores with another busy process several times slower (results/perf/threads.md).
"""

import os as _os
import sys as _sys


def set_openmp_defaults() -> None:
    """Wait briefly, then sleep (unless ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is set, or torch is loaded)."""
    if "torch" in _sys.modules or "OMP_WAIT_POLICY" in _os.environ or "GOMP_SPINCOUNT" in _os.environ:
        return
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    _os.environ["GOMP_SPINCOUNT"] = "1000"


set_openmp_defaults()
