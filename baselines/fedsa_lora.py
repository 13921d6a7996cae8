"""FedSA-LoRA (Guo et al., ICLR 2025): only ``A`` is shared and averaged; ``B`` and the head stay local.

The paper's observation is that ``A`` learns general knowledge and ``B`` client-specific knowledge, so
the server averages the ``A`` matrices (zero-padded to ``r_max`` for heterogeneous ranks) and every
client keeps its own ``B_i`` and classification head across rounds. There is no single global model:
the method is personalised. Each round the simulator evaluates every client's own model
``W0 + s_i B_i A_g[:r_i]`` with its own head on the global test set and reports the unweighted mean of
the clients' accuracies (the record says so; the partitions here have no local test splits). Clients
start from the shared seeded ``A`` (FedIT's round-0 draw), ``B_i = 0`` and the common initial head.

Communication: ``r_i k`` up and down (``A`` only); the head never travels.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ilora.algorithm import ClientModel, CommContext, Message, MethodConfig, clone_tensors, message_part, register
from ilora.global_adapter import GlobalAdapterMethod
from ilora.lowrank import cut_pair


def a_both_ways(c: CommContext) -> tuple[int, int]:
    """``r_i k`` up and down: only ``A`` travels."""
    return c.rank * c.k, c.rank * c.k


@dataclass
class FedSALoRAConfig(MethodConfig):
    """FedSA-LoRA has no options of its own."""


@register("fedsa_lora", display_name="FedSA-LoRA", comm=a_both_ways, comm_text="r_i k up, r_i k down (B, head local)",
          groups=("extended",), shares_head=False, personalised=True)
class FedSALoRA(GlobalAdapterMethod):
    """Shared, averaged ``A``; every client's own ``B`` and head (personalised evaluation)."""

    Config = FedSALoRAConfig

    def init_client(self, cid: int) -> dict[str, dict[str, Tensor]]:
        """A client's local part: ``B_i = 0`` at its rank and the common initial head."""
        _, B = cut_pair(self.A, self.B, self.fed.ranks[cid])  # the global B stays zero: B_i starts at 0
        return {"B": B, "head": clone_tensors(self.fed.head_init)}

    def personal_model(self, cid: int, A: dict[str, Tensor]) -> ClientModel:
        state = self.client_state(cid)
        return ClientModel(A=A, B=clone_tensors(state["B"]), head=clone_tensors(state["head"]),
                           scale=self.fed.scale(self.fed.ranks[cid]))

    def download(self, cid: int) -> tuple[Message, ClientModel]:
        A, _ = cut_pair(self.A, self.B, self.fed.ranks[cid])
        model = self.personal_model(cid, A)
        return model.flat(factors=("A",), head=False), model

    def receive(self, cid: int, message: Message, round_index: int) -> ClientModel:
        return self.personal_model(cid, message_part(message, "lora_A"))

    def upload(self, cid: int, trained: ClientModel) -> Message:
        state = self.client_state(cid)
        state["B"], state["head"] = clone_tensors(trained.B), clone_tensors(trained.head)
        return trained.flat(factors=("A",), head=False)

    def aggregate(self, uploads: dict[int, Message], weights: dict[int, float]) -> None:
        self.A, _ = self.combine(uploads, weights)  # the zero-padded average of A; B and heads stay local

    def client_eval_models(self) -> dict[int, ClientModel]:
        return {cid: self.personal_model(cid, cut_pair(self.A, self.B, r)[0]) for cid, r in enumerate(self.fed.ranks)}

    def eval_model(self) -> ClientModel:
        """Not used for the accuracy (see ``client_eval_models``): the first client's model, for export."""
        return self.client_eval_models()[0]
