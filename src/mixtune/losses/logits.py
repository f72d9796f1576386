"""From a model and a batch to per-token NLL, with or without the full logits.

The plain path runs the model and scores its ``(B, T, V)`` logits
(:func:`~mixtune.losses.core.token_losses`), every position's, prompt and padding included.
Two paths project only the supervised positions' hidden states:

- the *supervised* path (``train.logits: supervised``) projects them at once and lets autograd
  keep their logits: the plain path's computation without the prompt's and padding's share of
  the output layer and the cross-entropy (faster wherever a prompt is not learned; the logits
  held are (supervised tokens, V) instead of (B, T, V));
- the *chunked* path (``train.logits: chunked``) never holds them. At a large vocabulary those
  logits dominate memory: 2,048 tokens at SmolLM2's 49,152 entries are 400 MB in fp32, and the
  cross-entropy keeps another copy of that size for the backward. So:

1. the model runs with its output projection (``lm_head``) turned into the identity for that one
   call, so its "logits" are the final hidden states, ``(B, T, H)``;
2. only the supervised positions are kept (prompt and padding tokens are never scored);
3. those are projected and scored ``chunk`` tokens at a time; the backward recomputes one
   chunk's logits at a time and accumulates the output layer's gradient in place
   (:class:`_LinearNLL`), instead of keeping every token's logits.

Per-token NLL and mask come back in the plain path's shape and meaning (0 where masked), so
every loss and every measurement (evaluation, probes, look-aheads, CADFT's compatibility) is
the same computation up to float rounding; tests/test_chunked_logits.py holds it to 1e-5 in
values and gradients against the plain path.

Which path a model takes is set once per model (:func:`configure`, from ``train.logits``) and
read at every forward through :func:`token_nll` / :func:`loss_terms`. The chunked path is only
taken when it is known to compute the same thing: the output layer is a plain ``nn.Linear`` (not
a LoRA-wrapped one) and a check forward on a few tokens gives the same logits both ways (a model
that soft-caps its logits after the projection fails it and keeps the plain path, with a notice;
a linear rescaling after it commutes with the projection and passes).
"""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch
import torch.nn.functional as F

from mixtune.data.tokenize import IGNORE
from mixtune.losses.base import Loss
from mixtune.losses.core import LossTerms, token_losses

log = logging.getLogger(__name__)

AUTO_MIN_VOCAB = 32_768
"""``train.logits: auto`` chunks models with at least this many vocabulary entries (SmolLM2,
Llama, Qwen); below it the full logits are small and the plain path is kept."""

_CHUNK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Model (unwrapped) -> tokens per chunk on the chunked path, or :data:`WHOLE` on the
supervised path."""

WHOLE = 0
"""``_CHUNK`` value of the supervised path: every supervised token in one projection, under
plain autograd."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP's wrapper (FSDP2 and peft modify or wrap in place: unchanged)."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def configure(model: torch.nn.Module, mode: str, chunk: int, sharded: bool = False) -> bool:
    """Put ``model`` on the chunked path or the plain one; True if chunked.

    ``mode`` is ``train.logits``: ``full`` (plain), ``chunked`` or ``supervised`` (refused with
    a ValueError when the model cannot take it), ``auto`` (chunked when the vocabulary has at
    least :data:`AUTO_MIN_VOCAB` entries, else supervised, when the model can take it; else
    plain). ``sharded``: the run shards parameters with FSDP2, where the output layer's weight
    is only gathered inside the model's forward; the plain path is kept there. Call before the
    model is wrapped for DDP.
    """
    model = unwrap(model)
    _CHUNK.pop(model, None)
    if mode == "full":
        return False
    head = model.get_output_embeddings()
    vocab = getattr(head, "out_features", 0)
    if mode == "auto":
        mode = "chunked" if vocab >= AUTO_MIN_VOCAB else "supervised"
        explicit = False
    else:
        explicit = True
    why = "train.fsdp shards the output layer" if sharded else _unsupported(model, head)
    if why is not None:
        if explicit:
            raise ValueError(
                f"train.logits={mode}: {why}; use train.logits=full (or auto, which falls back)"
            )
        log.info("logits: full (only supervised positions cannot be projected here: %s)", why)
        return False
    if mode == "supervised":
        _CHUNK[model] = WHOLE
        log.info("logits: supervised positions only (vocabulary %d)", vocab)
    else:
        _CHUNK[model] = chunk
        log.info("logits: chunked, %d tokens per chunk (vocabulary %d)", chunk, vocab)
    return True


def is_chunked(model: torch.nn.Module) -> bool:
    """Whether ``model`` projects only its supervised positions (chunked or supervised path)."""
    return unwrap(model) in _CHUNK


def token_nll(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nll, mask)``, both (B, T-1), as :func:`~mixtune.losses.core.token_losses` of the
    model's logits; on the chunked path without ever holding them. Runs under the caller's
    grad mode, autocast and module modes. ``position_ids`` (and no attention mask): a packed
    row (:func:`mixtune.data.collate.pack`)."""
    inputs = _inputs(input_ids, attention_mask, position_ids)
    chunk = _CHUNK.get(unwrap(model))
    if chunk is None:
        return token_losses(model(**inputs).logits, labels)
    with _hidden_only(unwrap(model)) as head:
        hidden = model(**inputs).logits  # (B, T, H)
    if chunk == WHOLE:
        return supervised_nll(hidden, head.weight, head.bias, labels)
    return chunked_nll(hidden, head.weight, head.bias, labels, chunk)


def loss_terms(loss: Loss, model: torch.nn.Module, batch: dict, extra=None) -> LossTerms:
    """The loss's terms for one micro-batch: ``loss.terms`` on :func:`token_nll` on the chunked
    path where the loss scores per-token NLL, else ``loss(logits, labels, extra)`` on the full
    logits (one forward either way)."""
    ids, labels, positions = batch["input_ids"], batch["labels"], batch.get("position_ids")
    if is_chunked(model) and _scores_nll(loss):
        nll, mask = token_nll(model, ids, batch.get("attention_mask"), labels, positions)
        return loss.terms(nll, mask, extra)
    logits = model(**_inputs(ids, batch.get("attention_mask"), positions)).logits
    return loss(logits, labels, extra)


def _scores_nll(loss) -> bool:
    """Whether ``loss`` computes its terms from per-token NLL (``terms``) rather than from the
    logits themselves (a loss that overrides ``__call__``)."""
    cls = type(loss)
    if isinstance(loss, Loss) and cls.__call__ is not Loss.__call__:
        return False
    terms = getattr(cls, "terms", None)
    return terms is not None and terms is not Loss.terms


def _inputs(input_ids, attention_mask, position_ids) -> dict:
    """Forward arguments: padded rows, or packed ones (positions and no cache: transformers
    then masks packed examples apart)."""
    if position_ids is None:
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    return {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}


def supervised_nll(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL from final hidden states (B, T, H) and the output layer, projecting the
    supervised positions only, in one go; ``(nll, mask)`` as
    :func:`~mixtune.losses.core.token_losses`."""
    h, y, mask = _supervised(hidden, labels)
    flat = F.cross_entropy(F.linear(h, weight, bias).float(), y, reduction="none")  # (N,)
    return _scatter(flat, mask), mask


def chunked_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL from final hidden states (B, T, H) and the output layer, ``chunk``
    supervised tokens at a time; ``(nll, mask)`` as :func:`~mixtune.losses.core.token_losses`."""
    h, y, mask = _supervised(hidden, labels)
    return _scatter(_LinearNLL.apply(h, weight, bias, y, chunk), mask), mask


def _supervised(hidden: torch.Tensor, labels: torch.Tensor):
    """``(h, y, mask)``: the hidden states (N, H) at the supervised positions, their targets
    (N,), and the (B, T-1) mask they came from (position t predicts token t+1)."""
    target = labels[:, 1:]
    mask = target != IGNORE
    return hidden[:, :-1][mask], target[mask], mask


def _scatter(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (N,) back into the (B, T-1) shape, 0 where masked, fp32."""
    nll = torch.zeros(mask.shape, dtype=torch.float32, device=flat.device)
    return nll.masked_scatter(mask, flat.float())


class _LinearNLL(torch.autograd.Function):
    """``cross_entropy(linear(h, weight, bias), y)`` per row, ``chunk`` rows at a time.

    Nothing of size vocabulary x rows is kept between forward and backward: the backward
    recomputes each chunk's logits, turns them into the gradient of the logits in place
    (``softmax - onehot``, times the incoming gradient) and accumulates the weight's gradient
    into one buffer (in place where the compute dtype is the weight's). Peak memory beyond the
    inputs: one chunk's logits and the weight's gradient. Autocast applies as it would to the
    model's own output layer, in the backward as in the forward.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, y, chunk):
        ctx.amp = _autocast_state(h.device.type)
        out = torch.empty(y.shape, dtype=torch.float32, device=h.device)
        for s in range(0, y.numel(), chunk):
            z = F.linear(h[s : s + chunk], weight, bias).float()  # (C, V)
            out[s : s + chunk] = torch.logsumexp(z, -1) - z.gather(-1, y[s : s + chunk, None])[:, 0]
        ctx.save_for_backward(h, weight, bias, y)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, y = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros_like(weight) if need_w else None
        db = torch.zeros_like(bias) if need_b and bias is not None else None
        device_type, enabled, dtype = ctx.amp
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            for s in range(0, y.numel(), ctx.chunk):
                hc, yc = h[s : s + ctx.chunk], y[s : s + ctx.chunk]
                z = F.linear(hc, weight, bias).float()  # (C, V), then d nll / d logits in place
                z = z.sub_(z.amax(-1, keepdim=True)).exp_()
                z.div_(z.sum(-1, keepdim=True))
                z[torch.arange(len(yc), device=z.device), yc] -= 1
                z.mul_(grad[s : s + ctx.chunk, None])
                if dh is not None:
                    dh[s : s + ctx.chunk] = z @ weight
                if dw is not None:
                    if z.dtype == hc.dtype == dw.dtype and not enabled:
                        dw.addmm_(z.t(), hc)
                    else:
                        dw += (z.t() @ hc).to(dw.dtype)
                if db is not None:
                    db += z.sum(0).to(db.dtype)
        return dh, dw, db, None, None


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    if device_type not in ("cpu", "cuda", "xpu", "mps"):
        return device_type, False, torch.float32
    return (
        device_type,
        torch.is_autocast_enabled(device_type),
        torch.get_autocast_dtype(device_type),
    )


@contextlib.contextmanager
def _hidden_only(model: torch.nn.Module):
    """The output layer passes its input through for the duration; yields the layer."""
    head = model.get_output_embeddings()
    head.forward = _identity  # an instance attribute shadows nn.Linear.forward
    try:
        yield head
    finally:
        del head.forward


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _unsupported(model: torch.nn.Module, head) -> str | None:
    """Why the chunked path would not compute this model's logits (None: it would)."""
    if type(head) is not torch.nn.Linear:
        name = type(head).__name__
        return f"the output layer is a {name}, not a plain Linear (LoRA on lm_head?)"
    # A check forward: the projection of the hidden states must be the model's logits (models
    # that soft-cap logits after lm_head fail here and keep the plain path).
    device = head.weight.device
    n = min(8, head.out_features)
    ids = torch.arange(1, n + 1, device=device)[None] % head.out_features
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
            with _hidden_only(model):
                hidden = model(input_ids=ids).logits
            again = F.linear(hidden, head.weight, head.bias).float()
    finally:
        model.train(was_training)
    if again.shape != logits.shape or not torch.allclose(again, logits, rtol=1e-4, atol=1e-4):
        return "the model transforms its logits after the output layer"
    return None


def packing_problem(model: torch.nn.Module) -> str | None:
    """Why one packed row (:func:`mixtune.data.collate.pack`) would not compute what separate
    rows do for ``model`` (None: it would), from a check forward of two short sequences.

    Flash-attention implementations are not checked here: they run only in half precision on
    a GPU, which the model is not yet on; transformers gives a packed row (no attention mask,
    restarting ``position_ids``) to their variable-length kernel, one sequence per example.
    bench/gpu_check.py compares their packed per-example losses with padded ones on the GPU."""
    model = unwrap(model)
    impl = getattr(model.config, "_attn_implementation", None) or ""
    if impl.startswith("flash_attention"):
        return None
    vocab = model.get_input_embeddings().weight.shape[0]
    a = torch.arange(1, 6)[None] % vocab
    b = torch.arange(7, 10)[None] % vocab
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sep = [model(input_ids=x.to(device), use_cache=False).logits.float() for x in (a, b)]
            ids = torch.cat([a, b], 1).to(device)
            pos = torch.cat([torch.arange(5), torch.arange(3)])[None].to(device)
            packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. no position_ids argument
        return f"a packed forward fails ({type(e).__name__}: {str(e)[:120]})"
    finally:
        model.train(was_training)
    together = torch.cat(sep, 1)
    if packed.shape != together.shape or not torch.allclose(packed, together, atol=1e-3):
        impl = getattr(model.config, "_attn_implementation", None)
        return f"the model's attention ({impl}) lets packed examples see each other"
    return None
