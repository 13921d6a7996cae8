"""One place that keeps the libraries' own chatter out of the suite's output: Hugging Face load reports and
progress bars, Ray's accelerator tip, Flower's notice that the embedded simulation API is deprecated. The
suite prints its own progress; every process that builds a model or starts a pool calls ``quiet_libraries``."""

from __future__ import annotations

import logging
import os
import warnings


class _HideFlowerSimulationNotice(logging.Filter):
    """``ilora run engine=flower`` embeds Flower's simulation (``flwr.simulation.run_simulation``), which
    Flower marks as deprecated in favour of its CLI; the notice says nothing a user of the suite can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("DEPRECATED FEATURE") and "run_simulation" in str(record.args))


_FLOWER_FILTER = _HideFlowerSimulationNotice()


def quiet_libraries() -> None:
    """Silence the libraries' load reports, warnings and progress bars in this process (the CLI, a sweep's
    pool worker, a Flower ClientApp's process)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
    flower_logger = logging.getLogger("flwr")
    if _FLOWER_FILTER not in flower_logger.filters:
        flower_logger.addFilter(_FLOWER_FILTER)
    try:
        import transformers
    except ImportError:
        return
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
