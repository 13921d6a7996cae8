"""The one federated simulator: every method runs through this round loop.

One frozen backbone lives in memory. For each sampled client the simulator loads that client's
factors and head into it (``ClientModel``), trains locally, reads the trained tensors back, and hands
them to the algorithm. Communication is counted from the algorithm's actual messages.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from ilora.algorithm import Algorithm, ClientModel, Gradients, Message, message_bytes
from ilora.config import RunConfig
from ilora.models import Backbone, Batch
from ilora.server_update import aggregate_round, clip_update


@dataclass
class RoundRecord:
    round: int
    clients: list[int]
    accuracy: float
    loss: float
    train_loss: float
    uplink_bytes: int
    downlink_bytes: int
    train_s: float  # local training, all clients (includes loading and reading their tensors)
    compute_s: float  # forward/backward/optimiser steps and evaluation forwards only
    aggregate_s: float
    eval_s: float
    wall_s: float
    first_step_update: float = float("nan")  # mean over clients of ||s B A change|| from the first local step
    client_steps: list[int] = field(default_factory=list)  # optimiser steps of each client in ``clients``, in order
    client_accuracy: list[float] = field(default_factory=list)  # personalised methods: each client's own model
    extra: dict = field(default_factory=dict)  # an engine's own facts (Flower: bytes as transmitted), flattened

    @property
    def overhead_share(self) -> float:
        """Share of the round spent outside forward/backward/optimiser steps and eval forwards."""
        return max(0.0, 1.0 - self.compute_s / self.wall_s) if self.wall_s > 0 else 0.0


def client_sampling_stream(num_clients: int, participation: float, rounds: int, seed: int) -> list[list[int]]:
    """Pre-drawn sampled clients per round (sorted), identical for every method with the same seed."""
    k = max(1, round(participation * num_clients))
    rng = np.random.default_rng([seed, 0x5A4D])
    return [sorted(rng.choice(num_clients, size=k, replace=False).tolist()) for _ in range(rounds)]


@dataclass
class Simulation:
    algorithm: Algorithm
    backbone: Backbone
    client_data: list[Batch]  # per client, tensors on the device
    test_data: Batch
    config: RunConfig  # the run's settings (rounds, local training, evaluation batch size, progress)
    sampling: list[list[int]]
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    noise_multiplier: float | None = None  # dp=sample: the run's sigma (RunParts.noise_multiplier)

    def __post_init__(self) -> None:
        self._cuda = self.device.type == "cuda"
        self._compute_s = 0.0
        self._test = sorted_by_length(self.test_data)
        if self.config.dp == "sample" and self.noise_multiplier is None:
            raise ValueError("dp=sample needs the run's noise multiplier (Simulation.noise_multiplier)")

    @property
    def compute_s(self) -> float:
        """Seconds of forward/backward/optimiser steps and evaluation forwards since the round began."""
        return self._compute_s

    # ---------------------------------------------------------------------------- the round loop
    def run(self, start_round: int = 0, on_round: Callable[[RoundRecord], None] | None = None) -> list[RoundRecord]:
        records = []
        algo = self.algorithm
        sizes = [len(d["labels"]) for d in self.client_data]
        if start_round == 0:
            algo.initialize(self.weight_gradient)
        rounds = tqdm(total=self.config.rounds, initial=start_round, desc="rounds", unit="round",
                      disable=not self.config.progress)
        for t in range(start_round, self.config.rounds):
            wall0 = self._now()
            self._compute_s = 0.0
            uploads, uplink, downlink, train_losses, first_steps, steps = {}, 0, 0, [], [], []
            for cid in tqdm(self.sampling[t], desc=f"round {t + 1}", unit="client", leave=False,
                            disable=not self.config.progress):
                message, model = algo.download(cid)
                downlink += message_bytes(message)
                uploads[cid], loss, first_step, client_steps = self.client_round(t, cid, model)
                uplink += message_bytes(uploads[cid])
                train_losses.append(loss)
                first_steps.append(first_step)
                steps.append(client_steps)
            train_s = self._now() - wall0

            total = sum(sizes[c] for c in uploads)
            agg0 = self._now()
            aggregate_round(algo, uploads, {c: sizes[c] / total for c in uploads}, t)
            aggregate_s = self._now() - agg0

            eval0 = self._now()
            accuracy, loss, client_accuracy = self.evaluate_round()
            eval_s = self._now() - eval0

            record = RoundRecord(
                round=t + 1, clients=list(uploads), accuracy=accuracy, loss=loss,
                train_loss=float(np.mean(train_losses)), uplink_bytes=uplink, downlink_bytes=downlink,
                train_s=train_s, compute_s=self._compute_s, aggregate_s=aggregate_s, eval_s=eval_s,
                wall_s=self._now() - wall0, first_step_update=float(np.mean(first_steps)),
                client_accuracy=client_accuracy, client_steps=steps,
            )
            records.append(record)
            rounds.set_postfix(acc=f"{accuracy:.4f}", loss=f"{loss:.3f}", refresh=False)
            rounds.update(1)
            if on_round is not None:
                on_round(record)
            if not math.isfinite(loss):
                break
        rounds.close()
        return records

    # ---------------------------------------------------------------------------- local training
    def client_round(self, round_index: int, cid: int, model: ClientModel) -> tuple[Message, float, float, int]:
        """Client ``cid``'s part of a round (both engines): train from ``model``, then its upload, clipped to
        ``dp_clip`` around ``model`` under client-level DP; with the loss, first-step change and steps."""
        trained, loss, first_step, steps = self.train_client(round_index, cid, model)
        upload = self.algorithm.upload(cid, trained)
        if self.config.dp == "client":
            upload = clip_update(upload, model, self.config.dp_clip)
        return upload, loss, first_step, steps

    def train_client(self, round_index: int, cid: int, model: ClientModel) -> tuple[ClientModel, float, float, int]:
        """Train client ``cid`` from ``model`` on its data.

        Returns the trained tensors, the mean training loss, the Frobenius norm of the change of
        the adapters' product ``s B A`` (all layers together) made by the first optimiser step, and the
        number of optimiser steps taken.

        Every step's gradient is, in this order: the batch's (``dp=sample``: the noisy mean of the clipped
        per-example gradients, see ``private_step_gradients``), plus the gradient of the method's ``local_loss``, plus
        FedProx's ``mu (w - w_start)``, plus the method's ``gradient_correction``; then ``grad_clip``, then the
        optimiser step. Under ``dp=sample`` the frozen backbone's BatchNorm layers run on their running
        statistics (eval mode): batch statistics would mix the examples of a batch.
        """
        cfg, algo, data = self.config, self.algorithm, self.client_data[cid]
        torch.manual_seed(int(np.random.SeedSequence([self.seed, round_index, cid]).generate_state(1)[0]))
        rng = np.random.default_rng([self.seed, round_index, cid])
        params = self.load(model)
        module = self.backbone.module
        module.train()
        private = cfg.dp == "sample"
        if private:
            batchnorm_eval(module)
            noise = dp_generator(self.seed, round_index, cid, self.device)
        trained = {k: p for k, p in params.items() if p.requires_grad}
        trainable = list(trained.values())
        # FedProx: the gradient of mu/2 ||w - w_start||^2 is added to each trained tensor's gradient, rather than
        # the term to the loss: the same step, without a second autograd graph, and the same code with and without
        # DP-SGD (the term does not depend on the data, so under dp=sample it is neither clipped nor noised)
        start = {k: p.detach().clone() for k, p in trained.items()} if cfg.fedprox_mu > 0 else None
        optimizer = make_optimizer(cfg, trainable)
        optimizer.zero_grad(set_to_none=True)  # nothing left over from earlier work on the shared backbone

        algo.on_local_start(cid, lambda **how: self.full_gradient(data, params, **how))
        correction = algo.gradient_correction(cid)
        losses, first_step = [], float("nan")
        for batch in self._batches(data, cfg.batch_size, rng, cfg.local_epochs, cfg.local_steps):
            before = None if losses else self._factors()
            t0 = self._now()
            penalty = algo.local_loss(cid, params)
            if private:
                loss = self.private_step_gradients(batch, trained, penalty, noise)
            else:
                with self._autocast():
                    loss = F.cross_entropy(self.backbone(batch).float(), batch["labels"])
                (loss if penalty is None else loss + penalty).backward()
            if start is not None:
                add_proximal_gradient(trained, start, cfg.fedprox_mu)
            if correction is not None:
                for name, c in correction.items():
                    if params[name].grad is not None:
                        params[name].grad.add_(c)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            self._compute_s += self._now() - t0
            if before is not None:
                first_step = self._product_change(before, model.scale)
        mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
        return self.read(model), mean_loss, first_step, len(losses)

    # ---------------------------------------------------------------------------- DP-SGD (dp=sample)
    def per_example_gradients(self, batch: Batch, trained: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """Each example's gradient of its own loss with respect to the ``trained`` tensors (flat names; each
        result has a leading batch dimension), and the examples' losses.

        ``torch.func``: the backbone is called functionally on one example at a time (a batch of one) under
        ``vmap``; dropout draws a different mask for every example (``randomness="different"``).
        """
        module = self.backbone.module
        paths = {id(p): name for name, p in module.named_parameters(remove_duplicate=False)}
        where = {k: paths[id(p)] for k, p in trained.items()}
        values = {k: p.detach() for k, p in trained.items()}
        batch = trim_padding(batch)

        def example_loss(weights: dict[str, Tensor], example: Batch) -> tuple[Tensor, Tensor]:
            one = {k: v.unsqueeze(0) for k, v in example.items()}
            with self._autocast():
                logits = functional_call(module, {where[k]: w for k, w in weights.items()}, (one,))
            loss = F.cross_entropy(logits.float(), one["labels"])
            return loss, loss.detach()

        per_example = vmap(grad(example_loss, has_aux=True), in_dims=(None, 0), randomness="different")
        return per_example(values, batch)

    def private_step_gradients(
        self, batch: Batch, trained: dict[str, torch.nn.Parameter], penalty: Tensor | None, noise: torch.Generator
    ) -> Tensor:
        """DP-SGD's gradient for one batch, written into the trained tensors' ``.grad``; returns the batch's mean loss.

        Each example's gradient (all trained tensors together) is clipped to ``dp_clip``; the clipped gradients
        are summed, ``N(0, (sigma dp_clip)^2)`` is added to every entry of the sum (drawn from ``noise``, seeded by
        run, round and client), and the result is divided by the batch's size (batches come from shuffling, so this
        is the size drawn, not Poisson sampling's expected size). The method's ``local_loss`` is a function of the
        parameters only (HetLoRA's prune penalty): its gradient is added exactly, after the noise, at no privacy cost.
        """
        clip, sigma = self.config.dp_clip, float(self.noise_multiplier or 0.0)
        grads, losses = self.per_example_gradients(batch, trained)
        total = clipped_sum(grads, clip)
        size = len(batch["labels"])
        if penalty is not None:
            penalty.backward()
        for k, p in trained.items():
            g = total[k]
            if sigma > 0:
                g = g + torch.normal(0.0, sigma * clip, g.shape, generator=noise, device=g.device, dtype=g.dtype)
            g = (g / size).to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g
        return losses.mean()

    def _factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {n: (l.effective_A.detach().clone(), l.lora_B.detach().clone())
                for n, l in self.backbone.lora_layers.items()}

    @torch.no_grad()
    def _product_change(self, before: dict[str, tuple[Tensor, Tensor]], scale: float) -> float:
        """``||s (B' A' - B A)||_F`` over all layers, from the thin factors (``[B', -B] [A'; A]``)."""
        total = 0.0
        for n, layer in self.backbone.lora_layers.items():
            A0, B0 = before[n]
            X = torch.cat([layer.lora_B, -B0], dim=1).double()
            Y = torch.cat([layer.effective_A.detach(), A0], dim=0).double()
            total += float(((X.T @ X) * (Y @ Y.T)).sum().clamp_min(0.0))  # ||X Y||_F^2 = <X^T X, Y Y^T>
        return abs(scale) * total**0.5

    def full_gradient(
        self, data: Batch, params: dict[str, torch.nn.Parameter], batch_means: bool = False, eval_mode: bool = False
    ) -> Gradients:
        """Gradient of the loss over all of ``data`` at the current parameters (no step).

        Default: the mean loss over the examples (the true full gradient), in training mode.
        ``batch_means``: the gradients of each batch's mean loss, summed and divided by the number of
        examples (about ``1 / batch_size`` of the mean gradient); ``eval_mode``: dropout off.
        """
        module = self.backbone.module
        if eval_mode:
            module.eval()
        for p in params.values():
            p.grad = None
        n = len(data["labels"])
        for batch in self._batches(data, self.config.batch_size, None, 1, None):
            t0 = self._now()
            with self._autocast():
                logits = self.backbone(batch).float()
                if batch_means:
                    loss = F.cross_entropy(logits, batch["labels"]) / n
                else:
                    loss = F.cross_entropy(logits, batch["labels"], reduction="sum") / n
            loss.backward()
            self._compute_s += self._now() - t0
        grads = {k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}
        for p in params.values():
            p.grad = None
        module.train()
        return grads

    def weight_gradient(self, examples: int) -> dict[str, Tensor]:
        """``dL/dW`` at ``W0`` for every adapted layer (``d x k``), ``L`` the mean loss over ``examples``
        training examples: the first ``ceil(examples / N)`` of each of the ``N`` clients, model in eval mode.

        Each client's batches give their parts (``weight_gradient_parts``), summed in client and batch order
        (as the gradients would accumulate; on Flower the clients compute their parts, the server sums).
        """
        per_client = -(-examples // len(self.client_data))
        total = sum(min(per_client, len(d["labels"])) for d in self.client_data)
        parts = [g for cid in range(len(self.client_data)) for g in self.weight_gradient_parts(cid, per_client, total)]
        return sum_in_order(parts)

    def weight_gradient_parts(self, cid: int, per_client: int, total: int) -> list[dict[str, Tensor]]:
        """Per batch of client ``cid``'s first ``per_client`` examples: the gradient at ``W0`` of the batch's
        summed loss divided by ``total``, for every adapted layer.

        Computed through the LoRA path: with ``A = I_k``, ``B = 0`` and scale 1 the layer is ``W0`` and
        the gradient of ``B`` is the gradient of ``W``; so every layer type (linear, 1x1 conv, fused qkv
        slice) is covered without touching the frozen weights.
        """
        chunk = {k: v[:per_client] for k, v in self.client_data[cid].items()}
        layers = self.backbone.lora_layers
        dtype = next(iter(self.backbone.head.values())).dtype
        A = {n: torch.eye(l.in_features, device=self.device, dtype=dtype) for n, l in layers.items()}
        B = {n: torch.zeros(l.out_features, l.in_features, device=self.device, dtype=dtype)
             for n, l in layers.items()}
        head = {n: p.detach().clone() for n, p in self.backbone.head.items()}
        params = self.load(ClientModel(A=A, B=B, head=head, scale=1.0, train_A=False))
        self.backbone.module.eval()
        parts = []
        for batch in self._batches(chunk, self.config.batch_size, None, 1, None):
            for p in params.values():
                p.grad = None
            with self._autocast():
                loss = F.cross_entropy(self.backbone(batch).float(), batch["labels"], reduction="sum") / total
            loss.backward()
            parts.append({n: params[f"lora_B/{n}"].grad.detach().clone() for n in layers})
        for p in params.values():
            p.grad = None
        self.backbone.module.train()
        return parts

    # ---------------------------------------------------------------------------- evaluation
    def evaluate_round(self) -> tuple[float, float, list[float]]:
        """The global model's accuracy and loss; for a personalised method, the mean over every client's
        own model on the same test set (unweighted), with the clients' accuracies."""
        personal = self.algorithm.client_eval_models()
        if personal is None:
            accuracy, loss = self.evaluate(self.algorithm.eval_model())
            return accuracy, loss, []
        results = [self.evaluate(model) for _, model in sorted(personal.items())]
        accuracies = [a for a, _ in results]
        return float(np.mean(accuracies)), float(np.mean([l for _, l in results])), accuracies

    @torch.no_grad()
    def evaluate(self, model: ClientModel) -> tuple[float, float]:
        """Accuracy and mean cross-entropy of ``model`` on the whole test set."""
        self.load(model)
        self.backbone.module.eval()
        correct, loss_sum = 0, 0.0
        n = len(self.test_data["labels"])
        for batch in self._batches(self._test, self.config.eval_batch_size, None, 1, None):
            t0 = self._now()
            with self._autocast():
                logits = self.backbone(batch).float()
            loss_sum += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            self._compute_s += self._now() - t0
        return correct / n, loss_sum / n

    # ---------------------------------------------------------------------------- backbone I/O
    def load(self, model: ClientModel) -> dict[str, torch.nn.Parameter]:
        """Put ``model`` into the shared backbone; return its parameters by flat name."""
        return load_client_model(self.backbone, model)

    def read(self, template: ClientModel) -> ClientModel:
        return read_client_model(self.backbone, template)

    # ---------------------------------------------------------------------------- helpers
    def _batches(
        self, data: Batch, batch_size: int, rng: np.random.Generator | None, epochs: int, steps: int | None
    ) -> Iterator[Batch]:
        n = len(data["labels"])
        if n == 0:
            return
        produced = 0
        epoch = 0
        while (steps is None and epoch < epochs) or (steps is not None and produced < steps):
            order = torch.from_numpy(rng.permutation(n)) if rng is not None else torch.arange(n)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size].to(data["labels"].device)
                yield {k: v[idx] for k, v in data.items()}
                produced += 1
                if steps is not None and produced >= steps:
                    return
            epoch += 1

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self._cuda else nullcontext()

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def sum_in_order(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Key-wise ``((p_0 + p_1) + p_2) + ...``: the order in which gradients accumulate."""
    total = {k: v.clone() for k, v in parts[0].items()}
    for part in parts[1:]:
        for k, v in part.items():
            total[k] = total[k] + v
    return total


def add_proximal_gradient(trained: dict[str, torch.nn.Parameter], start: dict[str, Tensor], mu: float) -> None:
    """FedProx: add ``mu (w - w_start)``, the gradient of ``mu/2 ||w - w_start||^2``, to each trained tensor's grad."""
    with torch.no_grad():
        for k, p in trained.items():
            prox = mu * (p - start[k])
            p.grad = prox if p.grad is None else p.grad.add_(prox)


def clipped_sum(per_example: dict[str, Tensor], clip: float) -> dict[str, Tensor]:
    """The sum over examples of each example's gradient scaled to norm at most ``clip`` (the norm over all tensors
    together; leading dimension: the example), as Opacus clips: factor ``min(1, clip / (norm + 1e-6))``."""
    squares = [g.reshape(g.shape[0], -1).double().pow(2).sum(1) for g in per_example.values()]
    norms = torch.stack(squares).sum(0).sqrt()
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("b,b...->...", factor.to(g.dtype), g) for k, g in per_example.items()}


def dp_generator(seed: int, round_index: int, cid: int, device: torch.device) -> torch.Generator:
    """DP-SGD's noise source for client ``cid`` in round ``round_index``: the same on every engine and on resume."""
    state = int(np.random.SeedSequence([seed, round_index, cid, 0xD9]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(state)


def batchnorm_eval(module: torch.nn.Module) -> None:
    """Put every BatchNorm layer of ``module`` in eval mode (running statistics): under DP-SGD an example's output
    must not depend on the other examples of its batch (the backbones already keep BatchNorm frozen this way)."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def trim_padding(batch: Batch) -> Batch:
    """A text batch cut to its longest row (``attention_mask``), as the text models cut it themselves; other
    batches as they are. Under ``vmap`` a model sees one example and cannot read its length."""
    if "attention_mask" not in batch:
        return batch
    width = batch["attention_mask"].shape[1]
    length = int(batch["attention_mask"].sum(1).max())
    if length == width:
        return batch
    return {k: v[:, :length] if v.dim() >= 2 and v.shape[1] == width else v for k, v in batch.items()}


def sorted_by_length(data: Batch) -> Batch:
    """Text examples ordered by token count, so that evaluation batches carry little padding.

    The text models trim each batch to its longest example, so this only removes work on padding;
    the examples and the accuracy are the same. Data without an ``attention_mask`` is returned as is.
    """
    if "attention_mask" not in data:
        return data
    order = torch.argsort(data["attention_mask"].sum(1), stable=True)
    return {k: v[order] for k, v in data.items()}


def make_optimizer(cfg: RunConfig, params: list[Tensor]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (valid: sgd, adamw)")


def load_client_model(backbone: Backbone, model: ClientModel) -> dict[str, torch.nn.Parameter]:
    """Load factors, offsets, base deltas and head into ``backbone``; return parameters by flat name."""
    params: dict[str, torch.nn.Parameter] = {}
    for name, layer in backbone.lora_layers.items():
        layer.set_factors(
            model.A[name], model.B[name], model.scale, model.offsets.get(name), model.train_A, model.train_B,
            R=None if model.R is None else model.R[name], train_R=model.train_R,
        )
        layer.set_base_delta(None if model.base_delta is None else model.base_delta.get(name))
        params[f"lora_A/{name}"] = layer.lora_A
        params[f"lora_B/{name}"] = layer.lora_B
        if layer.lora_R is not None:
            params[f"lora_R/{name}"] = layer.lora_R
    with torch.no_grad():
        for name, p in backbone.head.items():
            p.copy_(model.head[name])
            params[f"head/{name}"] = p
    return params


def read_client_model(backbone: Backbone, template: ClientModel) -> ClientModel:
    """The backbone's current trainable tensors (copied), with the rest of ``template``."""
    return ClientModel(
        A={n: layer.lora_A.detach().clone() for n, layer in backbone.lora_layers.items()},
        B={n: layer.lora_B.detach().clone() for n, layer in backbone.lora_layers.items()},
        head={n: p.detach().clone() for n, p in backbone.head.items()},
        scale=template.scale,
        offsets=template.offsets,
        base_delta=template.base_delta,
        train_A=template.train_A,
        train_B=template.train_B,
        R=None if template.R is None else {n: l.lora_R.detach().clone() for n, l in backbone.lora_layers.items()},
        train_R=template.train_R,
    )
