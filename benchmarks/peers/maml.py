"""MAML meta-training speed of PyTorch peers on the Omniglot CNN, on random tasks.

    benchmarks/peers/.venv/bin/python benchmarks/peers/maml.py --impl learn2learn \\
        --ways 5 --shots 1 --query 15 --meta-batch 32 --inner-steps 1 [--first-order]

One meta-step: for each of ``--meta-batch`` tasks, ``--inner-steps`` SGD steps at rate 0.4 on
the support cross-entropy (``ways * shots`` images) from the meta-parameters, then the query
cross-entropy (``ways * query`` images) at the adapted weights; the meta-gradient (second
order unless ``--first-order``) averaged over the tasks takes one Adam(1e-3) step.

Model: 4 blocks of [3x3 conv, 64 channels, stride 2, padding 1; batch norm on the current
batch's statistics (no running averages), learned scale and shift, eps 1e-3; ReLU], the mean
over the 2x2 spatial positions, Linear(64, ways). Inputs 1x28x28 uniform in [0, 1), labels
uniform in [0, ways): a pool of ``--pool`` meta-batches is drawn before timing and cycled.

Implementations (``--impl``):

- ``learn2learn``: ``l2l.vision.models.OmniglotCNN`` (its batch norms set to batch statistics
  only, eps 1e-3) in ``l2l.algorithms.MAML``; per task ``clone()``, ``adapt()``, query loss
  ``backward()``; gradients divided by the meta-batch before the step;
- ``func-loop``: a ``torch.nn.Module`` of the same layers called with
  ``torch.func.functional_call``; per task ``torch.func.grad`` of a function running the inner
  loop (itself ``torch.func.grad`` steps), in a Python loop over the tasks. First order: the
  inner loop runs outside the outer ``grad`` and the meta-gradient is the query gradient at
  the adapted weights;
- ``func-vmap``: the same per-task meta-gradient under ``torch.func.vmap`` over the task
  axis, then the mean.

Prints one JSON line (``tasks_per_s``, ``ms_per_step``, ...) on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from _common import emit, log, set_threads

IMPLS = ("learn2learn", "func-loop", "func-vmap")
INNER_LR = 0.4
OUTER_LR = 1e-3
HIDDEN = 64
BN_EPS = 1e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--steps", type=int, default=20, help="timed meta-steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed meta-steps first")
    parser.add_argument("--pool", type=int, default=4, help="distinct meta-batches, cycled")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("ways", "shots", "query", "meta_batch", "inner_steps", "steps", "pool",
                 "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def make_pool(args: argparse.Namespace):
    """``pool`` meta-batches of random tasks: tuples ``(xs, ys, xq, yq)`` with a leading task
    axis, NCHW float32 images and int64 labels."""
    import numpy as np
    import torch

    rng = np.random.default_rng(args.seed)
    n_s, n_q = args.ways * args.shots, args.ways * args.query
    pool = []
    for _ in range(args.pool):
        t = args.meta_batch
        xs = rng.random((t, n_s, 1, 28, 28), dtype=np.float32)
        xq = rng.random((t, n_q, 1, 28, 28), dtype=np.float32)
        ys = rng.integers(0, args.ways, (t, n_s))
        yq = rng.integers(0, args.ways, (t, n_q))
        pool.append(tuple(torch.from_numpy(a) for a in (xs, ys, xq, yq)))
    return pool


def conv4(ways: int):
    """The Omniglot CNN as a plain module (the func-* implementations)."""
    import torch
    from torch import nn

    layers: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, HIDDEN, 3, stride=2, padding=1),
            nn.BatchNorm2d(HIDDEN, eps=BN_EPS, track_running_stats=False),
            nn.ReLU(),
        ]
        channels = HIDDEN

    class Conv4(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(HIDDEN, ways)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x).mean(dim=(2, 3)))

    return Conv4()


def l2l_model(ways: int):
    """learn2learn's OmniglotCNN with every batch norm on batch statistics only, eps 1e-3.

    Its ConvBlocks build ``BatchNorm2d(affine=True)`` with the default running averages; in
    training mode those normalise with the batch statistics too, but also update the
    averages in place. Dropping the averages leaves the same forward pass without that work
    (``F.batch_norm(x, None, None, w, b, training=True)``), as the func-* models do.
    """
    import learn2learn as l2l
    from torch import nn

    model = l2l.vision.models.OmniglotCNN(output_size=ways, hidden_size=HIDDEN, layers=4)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
            m.eps = BN_EPS
    return model


def l2l_step(maml, opt, batch, args) -> None:
    import torch.nn.functional as F

    xs, ys, xq, yq = batch
    opt.zero_grad(set_to_none=True)
    for i in range(args.meta_batch):
        learner = maml.clone()
        for _ in range(args.inner_steps):
            learner.adapt(F.cross_entropy(learner(xs[i]), ys[i]))
        F.cross_entropy(learner(xq[i]), yq[i]).backward()
    for p in maml.parameters():
        p.grad.mul_(1.0 / args.meta_batch)
    opt.step()


def task_meta_grad_fn(model, args):
    """``g(params, xs, ys, xq, yq)``: one task's meta-gradient, a dict like ``params``.

    Second order: ``torch.func.grad`` of the query loss after the inner loop, differentiated
    through the inner steps (themselves ``torch.func.grad``). First order: the inner loop runs
    outside any outer transform (its gradients are constants) and the meta-gradient is the
    query loss's gradient at the adapted weights, so no second-order work is recorded.
    """
    import torch.nn.functional as F
    from torch.func import functional_call, grad

    def loss(params, x, y):
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    loss_grad = grad(loss)

    def adapt(params, xs, ys):
        fast = params
        for _ in range(args.inner_steps):
            grads = loss_grad(fast, xs, ys)
            fast = {k: fast[k] - INNER_LR * grads[k] for k in fast}
        return fast

    if args.first_order:

        def meta_grad(params, xs, ys, xq, yq):
            return loss_grad(adapt(params, xs, ys), xq, yq)

        return meta_grad

    def meta_loss(params, xs, ys, xq, yq):
        return loss(adapt(params, xs, ys), xq, yq)

    return grad(meta_loss)


def func_step_fn(model, opt, args):
    import torch
    from torch.func import vmap

    named = dict(model.named_parameters())
    params = {k: p.detach() for k, p in named.items()}  # share storage with the parameters
    meta_grad = task_meta_grad_fn(model, args)
    if args.impl == "func-vmap":
        batched = vmap(meta_grad, in_dims=(None, 0, 0, 0, 0))

        def grads_of(batch):
            return {k: g.mean(0) for k, g in batched(params, *batch).items()}
    else:

        def grads_of(batch):
            xs, ys, xq, yq = batch
            total = {k: torch.zeros_like(p) for k, p in params.items()}
            for i in range(args.meta_batch):
                for k, g in meta_grad(params, xs[i], ys[i], xq[i], yq[i]).items():
                    total[k].add_(g)
            return {k: g.div_(args.meta_batch) for k, g in total.items()}

    def step(batch) -> None:
        grads = grads_of(batch)
        for k, p in named.items():
            p.grad = grads[k]
        opt.step()

    return step


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*Gym.*")
    import torch

    set_threads(args.threads)
    torch.manual_seed(args.seed)
    pool = make_pool(args)

    libraries = {}
    if args.impl == "learn2learn":
        import learn2learn as l2l

        libraries["learn2learn"] = "learn2learn"
        model = l2l_model(args.ways)
        maml = l2l.algorithms.MAML(model, lr=INNER_LR, first_order=args.first_order)
        opt = torch.optim.Adam(maml.parameters(), lr=OUTER_LR)

        def step(batch) -> None:
            l2l_step(maml, opt, batch, args)
    else:
        model = conv4(args.ways)
        opt = torch.optim.Adam(model.parameters(), lr=OUTER_LR)
        step = func_step_fn(model, opt, args)
    model.train()

    log(f"maml {args.impl}: {args.warmup} warm-up + {args.steps} timed meta-steps")
    start = time.perf_counter()
    for i in range(args.warmup):
        step(pool[i % args.pool])
    compile_s = time.perf_counter() - start
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(pool[(args.warmup + i) % args.pool])
        times.append(time.perf_counter() - t0)
    total = sum(times)
    log(f"  {1000 * total / args.steps:.1f} ms/meta-step (min {1000 * min(times):.1f})")

    config = {
        "ways": args.ways, "shots": args.shots, "query": args.query,
        "meta_batch": args.meta_batch, "inner_steps": args.inner_steps,
        "first_order": args.first_order, "inner_lr": INNER_LR, "outer_opt": "adam",
        "outer_lr": OUTER_LR, "steps": args.steps, "warmup": args.warmup, "pool": args.pool,
        "seed": args.seed, "model": "conv4-s2-bn-mean-linear", "hidden": HIDDEN,
        "bn": "batch statistics, no running averages", "bn_eps": BN_EPS,
        "input": [1, 28, 28],
    }
    record = {
        "bench": "maml",
        "impl": args.impl,
        "config": config,
        "tasks_per_s": args.steps * args.meta_batch / total,
        "ms_per_step": 1000 * total / args.steps,
        "ms_per_step_min": 1000 * min(times),
        "compile_s": compile_s,
    }
    emit(record, threads=args.threads, libraries=libraries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
