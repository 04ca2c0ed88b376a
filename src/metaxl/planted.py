"""The planted-shift check: does the meta-gradient teach the RTN what the method's premise says?

MetaXL's premise is that source representations are *shifted* from the target's, and that an RTN
trained by the meta-gradient learns to shift them back. Real languages give no ground truth for that
shift; this module plants one. Source batches (and only they, under every method) are distorted
right after an encoder layer by a fixed, known, invertible linear map ``M``; the RTN at that layer
then sees ``M h``. An RTN that learns ``M^-1`` makes the composed map ``RTN(M h)`` the identity again.
A test-and-benchmark device, not a user feature (tests/test_planted_shift.py,
benchmarks/planted_shift.py).

>>> import torch
>>> from transformers import BertConfig, BertForTokenClassification
>>> model = BertForTokenClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
...     num_attention_heads=2, intermediate_size=20)).eval()
>>> shift = PlantedShift(model, layer=2, matrix=reflection(16, 4, seed=0))
>>> x = torch.tensor([[1, 2, 3]])
>>> plain = model(input_ids=x).logits
>>> with shift.active():
...     shifted = model(input_ids=x).logits
>>> bool((plain - shifted).abs().max() > 0), torch.equal(model(input_ids=x).logits, plain)
(True, True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .rtn import RTNInjector, _replace_hidden, encoder_parts


def reflection(dim: int, k: int, seed: int = 0) -> torch.Tensor:
    """``I - 2 Q Q^T`` for a random orthonormal ``Q`` (dim x k): flips the sign of a random
    k-dimensional subspace; orthogonal, its own inverse, at distance ``2 ||P h|| / ||h||`` from I.

    >>> m = reflection(8, 2)
    >>> bool(torch.allclose(m @ m, torch.eye(8), atol=1e-6))
    True
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, k, generator=g, dtype=torch.float64))
    return (torch.eye(dim, dtype=torch.float64) - 2 * q @ q.T).float()


class PlantedShift:
    """Multiplies the hidden states after ``layer`` (0 = embeddings) by ``matrix`` inside
    :meth:`active`. Its hook runs before any RTN hook on the same layer (``prepend``), so the RTN
    reads the distorted vectors. :meth:`install` makes a :class:`~metaxl.meta.Learner` enter it
    around every source-batch forward, for every method."""

    def __init__(self, model: nn.Module, layer: int, matrix: torch.Tensor) -> None:
        embeddings, blocks = encoder_parts(model)
        module = embeddings if layer == 0 else blocks[layer - 1]
        self.layer = layer
        self.matrix = matrix
        self.on = False
        self._handle = module.register_forward_hook(self._hook, prepend=True)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if not self.on:
            return None
        return _replace_hidden(output, self.apply)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.matrix.to(h.device, h.dtype).T

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        previous, self.on = self.on, True
        try:
            yield
        finally:
            self.on = previous

    def install(self, learner: Any) -> None:
        learner.source_context = self.active

    def remove(self) -> None:
        self._handle.remove()

    @torch.no_grad()
    def hidden(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The undistorted vectors after :attr:`layer` of the batch's real tokens (eval mode)."""
        was_training = model.training
        model.eval()
        try:
            out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
        finally:
            model.train(was_training)
        h = out.hidden_states[self.layer]
        mask = batch.get("attention_mask")
        return h[mask.bool()] if mask is not None else h.reshape(-1, h.shape[-1])

    @torch.no_grad()
    def distance(self, injector: RTNInjector | None, h: torch.Tensor) -> float:
        """How far the composed map ``RTN(M h)`` (``M h`` without an RTN) is from the identity on
        the vectors ``h``: the mean cosine distance ``1 - cos(RTN(M h), h)`` (the paper's distance
        for representations, Sec. 5; blind to a change of scale, which a classifier's decisions
        mostly are too). ``2 k / d`` on average for :func:`reflection` (d, k) and no RTN; 0 for an
        RTN that undoes M."""
        out = self.apply(h)
        if injector is not None:
            out = injector.rtns[injector.key(0, self.layer)](out)
        return float((1 - torch.nn.functional.cosine_similarity(out.float(), h.float(), dim=-1)).mean())
