"""Local knowledge retention as a personal adapter the silo keeps across rounds.

The silo's personalised model is the federated model plus a residual it learns on its own data:

    h              = input of the model's output layer W (its final hidden state)
    personal logits = W (h + A h) = logits + W A h          A: hidden x hidden, zero at the start

``A`` is trained at every local step on the silo's batch, on *detached* ``h`` and ``logits`` with
``W`` held fixed, so it learns what the federated model does not say about this silo's data (the
residual) and never changes the gradient of the model's own loss: the update the silo uploads is
exactly the one it would upload without the adapter, and the global model is unaffected. ``A`` and
its optimizer state stay on the silo, are never uploaded, and re-anchor onto every new global model
by construction (they act on whatever hidden state the new model computes). The design follows
FedRoD's personalised head on generic features (Chen & Chao, ICLR 2022), placed in hidden space so
that it costs hidden² parameters, not hidden × vocabulary.

An adapter can also hurt: on a pretrained model with a wide hidden state and few local steps it may
learn noise faster than signal. So the silo keeps a *prequential* score of it (Dawid 1984; with the
fading factor of Gama et al. 2013): at every local step, before either learns from its batches, the
adapter's loss on them is compared with the model's. The personalised model is the model plus the
adapter only while that faded gain is positive; otherwise it is the model itself. The score uses the
batches training draws anyway, so it costs no data and no extra forward pass, and the held-out split
stays untouched for reporting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

from fcmoe.errors import LayoutError

PREQUENTIAL_FADING = 0.9
"""Weight of the score so far at each new local step: about the last ten steps count, so an adapter that
starts badly and then learns is switched on once it does (and off again if it drifts)."""


def output_layer(model: nn.Module) -> nn.Linear:
    """The model's output layer (``lm_head``), which the adapter decodes through."""
    layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(layer, nn.Linear):
        raise LayoutError(f"personal adapter needs a linear output layer, model has {type(layer).__name__}")
    return layer


class PersonalAdapter(nn.Module):
    """``A`` and its AdamW state; ``attach`` a model, then ``personalise`` its logits."""

    def __init__(self, hidden_size: int, learning_rate: float, weight_decay: float = 0.0):
        super().__init__()
        self.residual = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.residual.weight)
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=learning_rate, weight_decay=weight_decay)
        self._hidden: torch.Tensor | None = None
        self._weight: torch.Tensor | None = None
        self.gain = 0.0  # faded mean over local steps of (model loss - personal loss) per token, before learning

    @property
    def helps(self) -> bool:
        """Whether the personalised model should include the adapter (its prequential gain is positive)."""
        return self.gain > 0.0

    def score(self, model_loss: float, personal_loss: float) -> None:
        """One local step's mean token losses (over its micro-batches), taken before the model or the
        adapter stepped on them."""
        self.gain = PREQUENTIAL_FADING * self.gain + (1.0 - PREQUENTIAL_FADING) * (model_loss - personal_loss)

    @classmethod
    def for_model(cls, model: nn.Module, learning_rate: float, weight_decay: float = 0.0) -> "PersonalAdapter":
        layer = output_layer(model)
        adapter = cls(layer.in_features, learning_rate, weight_decay)
        return adapter.to(layer.weight.device)

    @contextmanager
    def attach(self, model: nn.Module) -> Iterator["PersonalAdapter"]:
        """Capture the output layer's input on every forward while the context is open."""
        layer = output_layer(model)

        def capture(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            self._hidden, self._weight = inputs[0].detach(), layer.weight.detach()

        handle = layer.register_forward_pre_hook(capture)
        try:
            yield self
        finally:
            handle.remove()
            self._hidden = self._weight = None

    def personalise(self, logits: torch.Tensor) -> torch.Tensor:
        """Personal logits for the forward pass just run; gradients reach ``A`` only."""
        if self._hidden is None or self._weight is None:
            raise LayoutError("personal adapter used outside attach() or before a forward pass")
        hidden = self._hidden.to(self.residual.weight.dtype)
        correction = nn.functional.linear(self.residual(hidden), self._weight.to(hidden.dtype))
        return logits.detach() + correction.to(logits.dtype)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def attached(adapter: PersonalAdapter | None, model: nn.Module) -> AbstractContextManager:
    """``adapter.attach(model)``, or nothing to do without an adapter."""
    return adapter.attach(model) if adapter is not None else nullcontext()
