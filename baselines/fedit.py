"""FedIT (Zhang et al. 2023): FedAvg of the two LoRA factors, separately.

Heterogeneous ranks follow the usual zero-padding baseline: ``A_i`` gets zero rows and ``B_i`` zero
columns up to ``r_max``; the padded factors are averaged, and client ``i`` receives the first ``r_i``
rows of ``A_g`` and columns of ``B_g``. The server evaluates the full ``r_max`` adapter with scale
``alpha / r_max``. Known inexactness (tested): ``sum p B A - (sum p B)(sum p A)`` equals
``sum p (B - B_bar)(A - A_bar)``.

All of it is ``GlobalAdapterMethod``'s default behaviour. Options: ``control_variates`` (SCAFFOLD-FedIT)
and the audit options ``authors_merged_base``, ``authors_local_head`` (``ilora.global_adapter``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ilora.algorithm import both_factors_both_ways, register
from ilora.global_adapter import AuthorsOptions, GlobalAdapterMethod


@dataclass
class FedITConfig(AuthorsOptions):
    """FedIT has no options of its own: control variates and the authors' audit options."""


@register("fedit", display_name="FedIT", comm=both_factors_both_ways, comm_text="r_i(d+k) up, r_i(d+k) down",
          groups=("paper",))
class FedIT(GlobalAdapterMethod):
    """Clients train A and B from the global pair; the server averages A and B separately."""

    Config = FedITConfig
