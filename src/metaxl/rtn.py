"""Representation transformation networks (RTNs) and the hook that inserts them into any encoder.

An RTN g_phi is a small bottleneck feed-forward net (d -> r -> d) applied to the hidden states
after layer i of the encoder, for *source-language* batches only. It is never applied to target
batches nor at evaluation, and it is not part of the saved model.

Two variants:

* ``plain``: the paper's eq. (1), ``g(h) = W2 ReLU(W1 h + b1) + b2``, replacing ``h``.
* ``gated``: the official code's residual, sigmoid-gated form,
  ``g(h) = h + sigmoid(o[d]) * o[:d]`` with ``o = Linear(r -> d+1)(ReLU(Linear(d -> r)(h.detach())))``.
  Its residual keeps the source representation recognisable while the branch learns.

>>> import torch
>>> from transformers import BertConfig, BertForTokenClassification
>>> model = BertForTokenClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
...     num_attention_heads=2, intermediate_size=20, num_labels=3)).eval()
>>> injector = RTNInjector(model, layers=[0, 2], variant="plain", hidden=8)
>>> x = torch.tensor([[1, 2, 3]])
>>> plain = model(input_ids=x).logits
>>> with injector.applied():
...     transformed = model(input_ids=x).logits
>>> bool((plain - transformed).abs().max() > 0)
True
>>> torch.equal(model(input_ids=x).logits, plain)   # outside the context: untouched
True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import ConfigError


class PlainRTN(nn.Module):
    """Paper eq. (1): ``g(h) = W2 ReLU(W1 h + b1) + b2``.

    >>> rtn = PlainRTN(16, 4)
    >>> rtn(torch.zeros(2, 3, 16)).shape
    torch.Size([2, 3, 16])
    """

    def __init__(self, dim: int, hidden: int, preserve_norm: bool = False) -> None:
        super().__init__()
        self.preserve_norm = preserve_norm
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        for layer in (self.down, self.up):
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.up(torch.relu(self.down(h)))
        return rescale_to(out, h) if self.preserve_norm else out


class GatedRTN(nn.Module):
    """The official code's residual gated RTN: ``h + sigmoid(o[d]) * o[:d]``.

    The branch reads ``h.detach()`` as the official code does (``detach_input=True``), so the RTN's
    own gradient does not reach the layers below through the branch (it still does through the
    residual). With RTNs at several layers this also stops the hypergradient of a lower RTN from
    flowing through the input of an upper one; ``detach_input=False`` gives the exact derivative.

    ``init="identity"`` zero-initialises the output projection, so the RTN starts as the identity
    (the Xavier start of the official code changes each vector by about a third of its norm).

    >>> rtn = GatedRTN(16, 4)
    >>> h = torch.randn(2, 3, 16)
    >>> rtn(h).shape
    torch.Size([2, 3, 16])
    >>> torch.equal(GatedRTN(16, 4, init="identity")(h), h)
    True
    """

    def __init__(self, dim: int, hidden: int, detach_input: bool = True, init: str = "xavier",
                 preserve_norm: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.preserve_norm = preserve_norm
        self.detach_input = detach_input
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim + 1)
        for layer in (self.down, self.up):
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
        if init == "identity":  # o = 0: g(h) = h exactly; d g / d up.weight = gate * ReLU(down h) != 0
            nn.init.zeros_(self.up.weight)
        elif init != "xavier":
            raise ConfigError(f"unknown RTN init {init!r}; choose xavier or identity")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        o = self.up(torch.relu(self.down(h.detach() if self.detach_input else h)))
        gate = torch.sigmoid(o[..., self.dim : self.dim + 1])
        out = h + gate * o[..., : self.dim]
        return rescale_to(out, h) if self.preserve_norm else out


def rescale_to(out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``out`` rescaled, vector by vector, to the norms of ``h`` (``rtn_norm=preserve``): the RTN can
    turn a source vector but not lengthen it. Without this the first-order meta objective rewards
    inflating source vectors (a larger source gradient is a longer virtual step wherever source and
    target gradients agree), and an RTN trained fast does just that.

    >>> rescale_to(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929]]
    """
    return out * (h.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def make_rtn(variant: str, dim: int, hidden: int, detach_input: bool = True, init: str = "xavier",
             preserve_norm: bool = False) -> nn.Module:
    """Build one RTN.

    >>> type(make_rtn("gated", 16, 4)).__name__
    'GatedRTN'
    """
    if variant == "plain":
        if init != "xavier":
            raise ConfigError("the plain RTN replaces h and cannot start as the identity: use init=xavier")
        return PlainRTN(dim, hidden, preserve_norm)
    if variant == "gated":
        return GatedRTN(dim, hidden, detach_input, init, preserve_norm)
    raise ConfigError(f"unknown RTN variant {variant!r}; choose plain or gated")


def encoder_parts(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """Return ``(embeddings, [layer_1, ..., layer_N])`` of a Hugging Face encoder model.

    Works for BERT, RoBERTa / XLM-R, ELECTRA, DistilBERT and most encoders that expose their layer
    list, with or without a task head.

    >>> from transformers import BertConfig, BertModel
    >>> emb, layers = encoder_parts(BertModel(BertConfig(vocab_size=20, hidden_size=8,
    ...     num_hidden_layers=3, num_attention_heads=2, intermediate_size=8)))
    >>> len(layers)
    3
    """
    base = getattr(model, "base_model", model)
    embeddings = getattr(base, "embeddings", None)
    layers = None
    for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "layer", "h"):
        obj: Any = base
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, (nn.ModuleList, list)) and len(obj) > 0:
            layers = list(obj)
            break
    if embeddings is None or layers is None:
        raise ConfigError(
            f"cannot find the embeddings and layer list of {type(model).__name__}; RTNs support encoders "
            "exposing base_model.embeddings and base_model.encoder.layer (BERT, XLM-R, ELECTRA) or "
            "base_model.transformer.layer (DistilBERT)"
        )
    return embeddings, layers


def hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("hidden_size", "dim", "d_model"):
        if config is not None and isinstance(getattr(config, name, None), int):
            return int(getattr(config, name))
    raise ConfigError(f"cannot read the hidden size of {type(model).__name__} from its config")


def resolve_layers(layers: list[int], num_layers: int) -> list[int]:
    """Map ``-1`` to the last layer and check ``0 <= i <= N``.

    >>> resolve_layers([0, -1], 12)
    [0, 12]
    """
    out = []
    for layer in layers:
        index = num_layers if layer == -1 else layer
        if not 0 <= index <= num_layers:
            raise ConfigError(
                f"RTN layer {layer} is out of range: this encoder has {num_layers} layers, so use 0 "
                f"(embedding output) to {num_layers} (last layer), or -1 for the last"
            )
        out.append(index)
    if len(set(out)) != len(out):
        raise ConfigError(f"RTN layers {layers} repeat a layer")
    return sorted(out)


def _replace_hidden(output: Any, fn: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    if hasattr(output, "__getitem__") and hasattr(output, "last_hidden_state"):
        output.last_hidden_state = fn(output.last_hidden_state)
        return output
    raise TypeError(f"cannot apply an RTN to a layer output of type {type(output).__name__}")


class RTNInjector(nn.Module):
    """Holds the RTNs and inserts them after chosen encoder layers via forward hooks.

    The RTNs act only inside ``with injector.applied(source=k):``; everywhere else (target
    batches, evaluation, saving) the model is exactly the plain encoder. The RTN parameters (phi)
    live in this module, not in the model, so ``model.save_pretrained`` never contains them.

    Args:
        model: any HF encoder (with or without a task head).
        layers: layer indices, 0 = embedding output, N = last layer (``-1`` = last).
        variant: ``plain`` or ``gated``.
        hidden: bottleneck size r.
        num_sources: several source languages; with ``per_source=True`` each gets its own RTNs.
        detach_input: gated variant only: the branch reads ``h.detach()`` (official code).
        init: ``xavier`` (official code) or ``identity`` (gated only; see :class:`GatedRTN`).
        preserve_norm: rescale each output vector to its input's norm (:func:`rescale_to`).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[int],
        variant: str = "plain",
        hidden: int = 192,
        num_sources: int = 1,
        per_source: bool = False,
        detach_input: bool = True,
        init: str = "xavier",
        preserve_norm: bool = False,
    ) -> None:
        super().__init__()
        embeddings, blocks = encoder_parts(model)
        self.layers = resolve_layers(list(layers), len(blocks))
        self.variant = variant
        self.num_groups = num_sources if per_source else 1
        dim = hidden_size(model)
        self.rtns = nn.ModuleDict(
            {self.key(g, layer): make_rtn(variant, dim, hidden, detach_input, init, preserve_norm) for g in range(self.num_groups) for layer in self.layers}
        )
        self._active: int | None = None
        self._probe: dict[int, list[torch.Tensor]] | None = None  # relative_change's records, by layer
        self._probe_mask: torch.Tensor | None = None
        self._handles = []
        for layer in self.layers:
            module = embeddings if layer == 0 else blocks[layer - 1]
            self._handles.append(module.register_forward_hook(self._hook(layer)))

    @staticmethod
    def key(group: int, layer: int) -> str:
        return f"s{group}_L{layer}"

    def _hook(self, layer: int) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if self._active is None:
                return None
            rtn = self.rtns[self.key(self._active, layer)]
            if self._probe is None:
                return _replace_hidden(output, rtn)
            records = self._probe.setdefault(layer, [])

            def probed(h: torch.Tensor) -> torch.Tensor:
                out = rtn(h)
                hf, of = h.float(), out.float()
                norm = hf.norm(dim=-1).clamp_min(1e-12)
                stats = torch.stack([(of - hf).norm(dim=-1) / norm, of.norm(dim=-1) / norm,
                                     torch.nn.functional.cosine_similarity(of, hf, dim=-1)], dim=-1)
                mask = self._probe_mask
                if mask is not None and mask.shape == stats.shape[:-1]:
                    stats = stats[mask.bool()]
                records.append(stats.reshape(-1, 3))
                return out

            return _replace_hidden(output, probed)

        return hook

    @torch.no_grad()
    def relative_change(self, model: nn.Module, batch: dict[str, torch.Tensor], source: int = 0
                        ) -> dict[int, dict[str, float]]:
        """How the RTNs change source representations: for each RTN layer, means over the batch's
        real tokens of ``||RTN(h) - h|| / ||h||`` (``change``; 0: the identity), of
        ``||RTN(h)|| / ||h||`` (``norm_ratio``) and of ``cos(RTN(h), h)`` (``cosine``), in eval mode.
        The last two tell a rescaling (the first-order meta objective rewards larger source
        gradients) from a change of direction.

        >>> from transformers import BertConfig, BertForTokenClassification
        >>> model = BertForTokenClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=20, num_labels=3))
        >>> batch = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3)}
        >>> RTNInjector(model, [2], "gated", 8, init="identity").relative_change(model, batch)
        {2: {'change': 0.0, 'norm_ratio': 1.0, 'cosine': 1.0}}
        """
        was_training = model.training
        model.eval()
        self._probe, self._probe_mask = {}, batch.get("attention_mask")
        try:
            with self.applied(source):
                model(**{k: v for k, v in batch.items() if k != "labels"})
            out = {}
            for layer, r in sorted(self._probe.items()):
                mean = torch.cat(r).mean(dim=0).tolist()
                out[layer] = {"change": round(mean[0], 6), "norm_ratio": round(mean[1], 6), "cosine": round(mean[2], 6)}
            return out
        finally:
            self._probe, self._probe_mask = None, None
            model.train(was_training)

    def weight_drift(self, initial: dict[str, torch.Tensor]) -> float:
        """``||phi - phi_0|| / ||phi_0||`` over all RTN weights, ``initial`` a :meth:`state_dict` copy.

        >>> from transformers import BertConfig, BertModel
        >>> inj = RTNInjector(BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=8)), [1], "gated", 4)
        >>> start = {k: v.clone() for k, v in inj.state_dict().items()}
        >>> inj.weight_drift(start)
        0.0
        """
        now = self.state_dict()
        diff = sum(float((now[k].float() - v.float().to(now[k].device)).pow(2).sum()) for k, v in initial.items())
        base = sum(float(v.float().pow(2).sum()) for v in initial.values())
        return (diff / base) ** 0.5 if base > 0 else float(diff > 0)

    @contextlib.contextmanager
    def applied(self, source: int = 0) -> Iterator[None]:
        """Apply the RTNs (of source ``source`` when per-source) to forwards inside the block."""
        with self.restored(source if self.num_groups > 1 else 0):
            yield

    @property
    def active(self) -> bool:
        return self._active is not None

    @property
    def state(self) -> int | None:
        """Which RTN group the hooks apply now (None: none), for :meth:`restored`."""
        return self._active

    @contextlib.contextmanager
    def restored(self, state: int | None) -> Iterator[None]:
        """Run the block with the hooks in ``state`` (an earlier :attr:`state`): activation
        checkpointing replays a layer's forward in backward, outside :meth:`applied`."""
        previous = self._active
        self._active = state
        try:
            yield
        finally:
            self._active = previous

    def remove(self) -> None:
        """Detach the hooks: the model is back to the plain encoder for good."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
