"""Peak memory and time of the loss path: full logits vs mixtune.losses.logits' chunked path.

The loss path is everything after the decoder's final hidden states: the output projection,
the per-token cross-entropy, and their backward into the hidden states and the output layer's
weight. Each measurement runs in a fresh process (peak resident memory above the process's
resident memory just before the loss path; inputs and weight already allocated), so one
measurement's allocations cannot hide another's.

    python bench/logits_memory.py                       # SmolLM2 shape: vocab 49,152, width 576
    python bench/logits_memory.py --tokens 2048 --vocab 151936 --hidden 896   # Qwen2.5-0.5B

All tokens supervised (the chunked path's worst case: it skips unsupervised ones).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(mode: str, tokens: int, vocab: int, hidden: int, chunk: int) -> dict:
    import torch

    from mixtune.losses.core import token_losses
    from mixtune.losses.logits import chunked_nll

    torch.manual_seed(0)
    h = torch.randn(1, tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens))
    base = _rss_bytes()
    t0 = time.perf_counter()
    if mode == "full":
        nll, mask = token_losses(torch.nn.functional.linear(h, w), labels)
    else:
        nll, mask = chunked_nll(h, w, None, labels, chunk)
    (nll.sum() / mask.sum()).backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"mode": mode, "peak_mib": (peak - base) / 2**20, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", choices=["full", "chunked"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a.tokens, a.vocab, a.hidden, a.chunk)))
        return
    rows = {"full": [], "chunked": []}
    for _ in range(a.repeats):  # interleaved, so drift on a noisy machine hits both alike
        for mode in rows:
            out = subprocess.run(
                [sys.executable, __file__, "--one", mode]
                + [f"--{k}={getattr(a, k)}" for k in ("tokens", "vocab", "hidden", "chunk")],
                capture_output=True,
                text=True,
                check=True,
            )
            rows[mode].append(json.loads(out.stdout))
    print(f"loss path, {a.tokens} tokens, vocab {a.vocab}, width {a.hidden}, chunk {a.chunk}")
    med = {}
    for mode, rs in rows.items():
        med[mode] = {k: statistics.median(r[k] for r in rs) for k in ("peak_mib", "seconds")}
        print(
            f"  {mode:8s} peak {med[mode]['peak_mib']:8.1f} MiB   time {med[mode]['seconds']:.3f} s"
            f"   (median of {len(rs)})"
        )
    print(
        f"  chunked / full: memory {med['chunked']['peak_mib'] / med['full']['peak_mib']:.3f}, "
        f"time {med['chunked']['seconds'] / med['full']['seconds']:.2f}"
    )


if __name__ == "__main__":
    main()
