"""Per-domain evaluation during a run: the scheduled evaluations and the ones asked for.

The loop evaluates every domain in full at step 0, every ``train.eval_every`` steps and at the
last step (:meth:`Evaluator.scheduled`, test splits included). Each domain's change since step 0
gets a paired standard error (``change_se``: the same examples at both steps), so a reader can
tell a real move from evaluation noise. Mixers, probes and checkpoint selection ask for metrics
at other moments (:meth:`Evaluator.evaluate`, test splits left out unless asked); at a step
whose scheduled evaluation covers the request, its per-example scores are reused instead of
running the model again (evaluation recycling). ``pack_rows`` (a packed run's
``max_length``): every evaluation packs its batches' examples into rows without padding, so the
scheduled evaluation, a probe and a look-ahead all score examples the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

from mixtune.data.domains import EvalDomain
from mixtune.eval.domains import Scores, evaluate_examples, first_batches, loss_se, summarize


class Evaluator:
    """Evaluates ``model`` on ``all_domains``; ``domains`` are those a mixer may see."""

    def __init__(
        self,
        model,
        acc,
        tokenizer,
        all_domains: Sequence[EvalDomain],
        domains: Sequence[EvalDomain],
        pack_rows: int | None = None,
    ):
        self.model, self.acc, self.tokenizer = model, acc, tokenizer
        self.pack_rows = pack_rows
        self.all_domains, self.domains = all_domains, domains
        self.cache: dict | None = None  # the latest scheduled evaluation (JSON form)
        self.base_scores: dict | None = None  # step 0's per-example scores (JSON form)

    def scheduled(self, step: int) -> dict[str, dict]:
        """Every domain's metrics at ``step`` over all its examples; kept for recycling."""
        scores = evaluate_examples(
            self.model, self.acc, self.all_domains, self.tokenizer, pack_rows=self.pack_rows
        )
        result = summarize(scores, self.all_domains)
        if step == 0:
            self.base_scores = {k: v.to_json() for k, v in scores.items()}
        elif self.base_scores:
            # change_se: standard error of (loss now − loss at step 0), paired over the same
            # examples: whether a domain moved by more than its evaluation noise
            for k, v in scores.items():
                if k in self.base_scores:
                    base = Scores.from_json(self.base_scores[k])
                    result[k]["change_se"] = loss_se(v.nll - base.nll, v.tokens)
        self.cache = {
            "step": step,
            "n_batches": None,
            "accuracy": True,
            "result": result,
            "scores": {k: v.to_json() for k, v in scores.items()},
        }
        return result

    def evaluate(
        self,
        step: int,
        n_batches: int | None = None,
        accuracy: bool = True,
        use_cache: bool = True,
        per_example: bool = False,
        include_test: bool = False,
    ) -> dict[str, dict]:
        """Metrics of every domain (``eval.domains.summarize``) at ``step`` over its first
        ``n_batches`` batches.

        ``step``'s scheduled evaluation is reused when it covers them (evaluation recycling):
        the numbers are computed from its per-example scores on exactly the requested
        batches, so an anchor recycled from a full evaluation and a probe evaluated on
        ``n_batches`` batches see the same examples. ``per_example``: each domain's dict also
        holds its :class:`~mixtune.eval.domains.Scores` under ``"scores"`` (for paired
        differences; not JSON). Test-split domains (role ``test``) only with ``include_test``.
        """
        domains = self.all_domains if include_test else self.domains
        c = self.cache
        scores = None
        if (
            use_cache
            and c is not None
            and c["step"] == step
            and c.get("scores")
            and (c["n_batches"] is None or (n_batches is not None and c["n_batches"] >= n_batches))
            and (c["accuracy"] or not accuracy)
            and all(d.name in c["scores"] for d in domains)
        ):
            scores = {d.name: Scores.from_json(c["scores"][d.name]) for d in domains}
            if not accuracy:
                scores = {k: Scores(v.nll, v.tokens) for k, v in scores.items()}
        if scores is None:
            scores = evaluate_examples(
                self.model, self.acc, domains, self.tokenizer, n_batches, accuracy, self.pack_rows
            )
        scores = {d.name: first_batches(scores[d.name], d, n_batches) for d in domains}
        result = summarize(scores, domains)
        if per_example:
            for d in domains:
                result[d.name]["scores"] = scores[d.name]
        return result

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"eval_cache": self.cache, "base_scores": self.base_scores}

    def load_state_dict(self, state: dict) -> None:
        self.cache = state.get("eval_cache")
        self.base_scores = state.get("base_scores")
