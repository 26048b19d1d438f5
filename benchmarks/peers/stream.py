"""Continual-learning stream speed of PyTorch peers on a Permuted-MNIST-shaped stream.

    benchmarks/peers/.venv/bin/python benchmarks/peers/stream.py STREAM --impl {torch,avalanche}
        [--tasks 20] [--rows 1000] [--threads 2] [--seed 0]

STREAM is one of finetune, er, agem, gem, mer, lamaml. The stream: ``--tasks`` tasks (GEM: 5
unless given) of ``--rows`` rows, one base array x ~ U[0, 1)^(rows x 784) whose columns each
task permutes with its own fixed permutation, labels uniform in [0, 10) drawn per task (the
construction of metajax's ``benchmarks/speed.py``). MLP 784-100-100-10 with ReLU, one pass
over each task in order, batches of 10, plain SGD.

Learners (the defaults of metajax's ``perm-mnist-*`` presets):

- finetune: SGD 0.03;
- er: SGD 0.03; reservoir of 200; 10 memories drawn per batch and joined to the incoming 10,
  one step on the mean loss;
- agem: SGD 0.03; 250 memories per task; reference batch of 256 from past tasks' memories;
  ``g - (g.g_ref / g_ref.g_ref) g_ref`` when ``g.g_ref < 0``;
- gem: SGD 0.03; 250 memories per task; margin 0.5; each step the gradient on every past
  task's whole memory, and GEM's dual QP (quadprog) when a constraint is violated;
- mer: lr 0.03, reservoir 200; each incoming example: s=5 batches of the example and 10
  memories, one SGD step per row, within-batch Reptile beta 0.03, across-batch gamma 1.0;
- lamaml: reservoir 200, replay 10, 5 glances, per-parameter rates from 0.15 learned at 0.3,
  first order, one inner step per incoming example, meta-loss averaged over the inner steps,
  meta-gradients clipped to norm 2, inner steps with ``max(alpha, 0)``.

``--impl torch`` writes each learner by hand on tensors, a plain Python loop of updates;
``--impl avalanche`` runs avalanche-lib 0.6.0's strategies on a benchmark made from the same
tensors (train only; no metrics, no loggers). The JSON line's ``config`` says what each run
used, ``notes`` where an avalanche strategy differs from the workload. Each task is timed
separately; ``samples_per_s`` is ``rows * (tasks - 1)`` over the time of tasks 2..T (the first
one holds the warm-up).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings

from _common import emit, log, set_threads

STREAMS = ("finetune", "er", "agem", "gem", "mer", "lamaml")
IMPLS = ("torch", "avalanche")
BATCH = 10
HIDDEN = 100
LR = 0.03
MEMORY = 200  # er, mer, lamaml reservoir
REPLAY = 10  # er, mer, lamaml memories per batch
PER_TASK = 250  # agem, gem
REF_BATCH = 256  # agem
MARGIN = 0.5  # gem
MER_CFG = dict(beta=0.03, gamma=1.0, batches_per_example=5)
LAMAML_CFG = dict(alpha_init=0.15, lr_eta=0.3, glances=5, first_order=True, multi_step_loss=True,
              grad_clip_norm=2.0, clip_inner_rates=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stream", choices=STREAMS)
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--tasks", type=int, default=0, help="tasks (0: 20, GEM 5)")
    parser.add_argument("--rows", type=int, default=1000, help="training rows per task")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.tasks:
        args.tasks = 5 if args.stream == "gem" else 20
    if args.tasks < 2:
        parser.error("--tasks must be >= 2 (the first task is not timed)")
    if args.rows < BATCH or args.rows % BATCH:
        parser.error(f"--rows must be a positive multiple of the batch size {BATCH}")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def make_stream(tasks: int, rows: int, seed: int):
    """``x [tasks, rows, 784]`` float32 and ``y [tasks, rows]`` int64 torch tensors."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    base = rng.random((rows, 784), dtype=np.float32)
    x = np.stack([base[:, rng.permutation(784)] for _ in range(tasks)])
    y = rng.integers(0, 10, (tasks, rows))
    return torch.from_numpy(x), torch.from_numpy(y)


def make_mlp():
    """MLP 784-100-100-10; ``forward(x, task_labels=None)`` so avalanche's meta-learning
    strategies (which pass the task labels as a second argument) can call it too."""
    from torch import nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(784, HIDDEN), nn.ReLU(),
                nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                nn.Linear(HIDDEN, 10),
            )

        def forward(self, x, task_labels=None):
            return self.net(x)

    return MLP()


# --------------------------------------------------------------------------- hand-written


class Reservoir:
    """Reservoir sampling (Vitter's Algorithm R) over single examples; uniform draws with
    replacement."""

    def __init__(self, capacity: int, rng: random.Random, gen):
        import torch

        self.x = torch.zeros(capacity, 784)
        self.y = torch.zeros(capacity, dtype=torch.long)
        self.capacity, self.size, self.seen = capacity, 0, 0
        self.rng, self.gen = rng, gen

    def add(self, x, y) -> None:
        for i in range(x.shape[0]):
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
            else:
                slot = self.rng.randrange(self.seen + 1)
            if slot < self.capacity:
                self.x[slot] = x[i]
                self.y[slot] = y[i]
            self.seen += 1

    def sample(self, k: int):
        import torch

        idx = torch.randint(self.size, (k,), generator=self.gen)
        return self.x[idx], self.y[idx]


class EpisodicMemory:
    """``per_task`` slots per task, each incoming batch ring-written into its task's slots."""

    def __init__(self, tasks: int, per_task: int):
        import torch

        self.x = torch.zeros(tasks, per_task, 784)
        self.y = torch.zeros(tasks, per_task, dtype=torch.long)
        self.count = [0] * tasks
        self.pos = [0] * tasks
        self.per_task = per_task

    def write(self, task: int, x, y) -> None:
        for i in range(x.shape[0]):
            p = self.pos[task]
            self.x[task, p] = x[i]
            self.y[task, p] = y[i]
            self.pos[task] = (p + 1) % self.per_task
            self.count[task] = min(self.count[task] + 1, self.per_task)

    def task_rows(self, task: int):
        n = self.count[task]
        return self.x[task, :n], self.y[task, :n]


def flat(tensors):
    import torch

    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector, like):
    out, start = [], 0
    for t in like:
        out.append(vector[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out


def gem_project(g, G, margin: float):
    """GEM's projection: solve the dual ``min_v 1/2 v'(GG')v + (Gg)'v, v >= margin`` with
    quadprog (``GG'`` made positive definite by 1e-3 on its diagonal) and return
    ``G'v + g`` (float64 solve, float32 result)."""
    import numpy as np
    import quadprog
    import torch

    Gd = G.double().numpy()
    gd = g.double().numpy()
    t = Gd.shape[0]
    P = Gd @ Gd.T
    P = 0.5 * (P + P.T) + 1e-3 * np.eye(t)
    a = -(Gd @ gd)  # quadprog minimises 1/2 v'Pv - a'v subject to C'v >= b
    v = quadprog.solve_qp(P, a, np.eye(t), np.full(t, margin))[0]
    return torch.from_numpy(v @ Gd + gd).float()


def torch_learner(name: str, model, tasks: int, seed: int):
    """``update(x, y, task)`` for one incoming batch, written on plain tensors."""
    import torch
    import torch.nn.functional as F

    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR)
    gen = torch.Generator().manual_seed(seed + 1)
    rng = random.Random(seed + 2)

    def step_on(grads) -> None:
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()

    def grads_of(x, y):
        return torch.autograd.grad(F.cross_entropy(model(x), y), params)

    if name == "finetune":

        def update(x, y, task):
            step_on(grads_of(x, y))

        return update

    if name == "er":
        memory = Reservoir(MEMORY, rng, gen)

        def update(x, y, task):
            if memory.size:
                rx, ry = memory.sample(REPLAY)
                xb, yb = torch.cat([x, rx]), torch.cat([y, ry])
            else:
                xb, yb = x, y
            step_on(grads_of(xb, yb))
            memory.add(x, y)

        return update

    if name == "agem":
        episodic = EpisodicMemory(tasks, PER_TASK)
        past = {}  # task -> (x, y) of every stored row of tasks < task

        def update(x, y, task):
            grads = grads_of(x, y)
            if task > 0:
                if task not in past:
                    rows = [episodic.task_rows(k) for k in range(task)]
                    past[task] = (torch.cat([r[0] for r in rows]),
                                  torch.cat([r[1] for r in rows]))
                px, py = past[task]
                idx = torch.randint(px.shape[0], (REF_BATCH,), generator=gen)
                g, g_ref = flat(grads), flat(grads_of(px[idx], py[idx]))
                dot = torch.dot(g, g_ref)
                if dot < 0:
                    g = g - (dot / torch.dot(g_ref, g_ref)) * g_ref
                    grads = unflat(g, params)
            step_on(grads)
            episodic.write(task, x, y)

        return update

    if name == "gem":
        episodic = EpisodicMemory(tasks, PER_TASK)

        def update(x, y, task):
            episodic.write(task, x, y)
            grads = grads_of(x, y)
            if task > 0:
                G = torch.stack([flat(grads_of(*episodic.task_rows(k))) for k in range(task)])
                g = flat(grads)
                if (G @ g < 0).any():
                    grads = unflat(gem_project(g, G, MARGIN), params)
            step_on(grads)

        return update

    if name == "mer":
        memory = Reservoir(MEMORY, rng, gen)
        beta, gamma, s = MER_CFG["beta"], MER_CFG["gamma"], MER_CFG["batches_per_example"]

        def update(x, y, task):
            for i in range(x.shape[0]):
                xi, yi = x[i:i + 1], y[i:i + 1]
                with torch.no_grad():
                    before_example = [p.clone() for p in params]
                for _ in range(s):
                    if memory.size:
                        rx, ry = memory.sample(REPLAY)
                        xb, yb = torch.cat([xi, rx]), torch.cat([yi, ry])
                    else:
                        xb, yb = xi, yi
                    with torch.no_grad():
                        before_batch = [p.clone() for p in params]
                    for r in range(xb.shape[0]):
                        grads = grads_of(xb[r:r + 1], yb[r:r + 1])
                        with torch.no_grad():
                            torch._foreach_add_(params, grads, alpha=-LR)
                    with torch.no_grad():  # theta <- theta_W + beta (theta - theta_W)
                        torch._foreach_lerp_(params, before_batch, 1.0 - beta)
                with torch.no_grad():  # theta <- theta_A + gamma (theta - theta_A)
                    torch._foreach_lerp_(params, before_example, 1.0 - gamma)
                memory.add(xi, yi)

        return update

    if name == "lamaml":
        return lamaml_update(model, params, Reservoir(MEMORY, rng, gen), gen)

    raise ValueError(f"unknown stream {name!r}")


def lamaml_update(model, params, memory: Reservoir, gen):
    """La-MAML (first order, asynchronous rates), the metajax preset's variant."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    names = [n for n, _ in model.named_parameters()]
    alpha = [torch.full_like(p, LAMAML_CFG["alpha_init"]) for p in params]
    lr_eta, clip = LAMAML_CFG["lr_eta"], LAMAML_CFG["grad_clip_norm"]

    def logits(weights, x):
        return functional_call(model, dict(zip(names, weights, strict=True)), (x,))

    def clip_(grads) -> None:
        """Scale ``grads`` in place to global norm ``clip`` when it is above."""
        norm = float(torch.linalg.vector_norm(flat(grads)))
        if norm > clip:
            for g in grads:
                g.mul_(clip / norm)

    def glance(x, y):
        order = torch.randperm(x.shape[0], generator=gen)
        xs, ys = x[order], y[order]
        if memory.size:
            rx, ry = memory.sample(REPLAY)
            mx, my = torch.cat([x, rx]), torch.cat([y, ry])
        else:
            mx, my = x, y
        theta0 = [p.detach().requires_grad_() for p in params]
        rates = [a.detach().requires_grad_() for a in alpha]
        steps = [F.relu(r) for r in rates]  # the inner steps use max(alpha, 0)
        fast, meta = theta0, 0.0
        for n in range(xs.shape[0]):
            # First order: the inner gradient is taken on a detached copy, a constant.
            leaves = [w.detach().requires_grad_() for w in fast]
            inner = F.cross_entropy(logits(leaves, xs[n:n + 1]), ys[n:n + 1])
            grads = torch.autograd.grad(inner, leaves)
            fast = [w - r * g for w, r, g in zip(fast, steps, grads, strict=True)]
            meta = meta + F.cross_entropy(logits(fast, mx), my)
        meta = meta / xs.shape[0]
        g_all = list(torch.autograd.grad(meta, theta0 + rates))
        g_theta, g_alpha = g_all[: len(params)], g_all[len(params):]
        clip_(g_theta)
        clip_(g_alpha)
        with torch.no_grad():
            for a, g in zip(alpha, g_alpha, strict=True):
                a.sub_(lr_eta * g)
            for p, a, g in zip(params, alpha, g_theta, strict=True):
                p.sub_(F.relu(a) * g)

    def update(x, y, task):
        for _ in range(LAMAML_CFG["glances"]):
            glance(x, y)
        memory.add(x, y)

    return update


def run_torch(args, x, y) -> tuple[list[float], dict]:
    import torch

    model = make_mlp()
    update = torch_learner(args.stream, model, args.tasks, args.seed)
    steps = args.rows // BATCH
    times = []
    for t in range(args.tasks):
        start = time.perf_counter()
        for b in range(steps):
            rows = slice(b * BATCH, (b + 1) * BATCH)
            update(x[t, rows], y[t, rows], t)
        times.append(time.perf_counter() - start)
        log(f"  task {t}: {times[-1]:.2f} s")
    for p in model.parameters():
        if not torch.isfinite(p).all():
            raise SystemExit("stream.py: non-finite parameters after training")
    return times, {}


# --------------------------------------------------------------------------- avalanche


def avalanche_strategy(args, model):
    """The avalanche strategy of ``args.stream`` and the notes on how it differs."""
    import torch
    from avalanche.training import AGEM, GEM, MER, Naive
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
    from avalanche.training.storage_policy import ReservoirSamplingBuffer
    from avalanche.training.supervised.lamaml_v2 import LaMAML

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    common = dict(model=model, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(),
                  train_mb_size=BATCH, train_epochs=1, eval_mb_size=100, device="cpu",
                  evaluator=EvaluationPlugin(loggers=[]), eval_every=-1)
    if args.stream == "finetune":
        return Naive(**common), {"strategy": "Naive"}, []
    if args.stream == "er":
        plugin = ReplayPlugin(mem_size=MEMORY, batch_size=BATCH, batch_size_mem=REPLAY,
                              storage_policy=ReservoirSamplingBuffer(max_size=MEMORY))
        config = {"strategy": "Naive + ReplayPlugin(ReservoirSamplingBuffer)"}
        notes = ["the reservoir is updated at the end of each experience, not per batch "
                 "(no replay during the first task)",
                 "the replay loader draws memories as an epoch over the buffer (without "
                 "replacement within a pass) rather than uniformly per batch"]
        return Naive(plugins=[plugin], **common), config, notes
    if args.stream == "agem":
        config = {"strategy": "AGEM", "patterns_per_exp": PER_TASK, "sample_size": REF_BATCH}
        notes = ["memory of a task is filled at the end of its experience (the first "
                 f"{PER_TASK} rows of a shuffled pass)"]
        return AGEM(patterns_per_exp=PER_TASK, sample_size=REF_BATCH, **common), config, notes
    if args.stream == "gem":
        config = {"strategy": "GEM", "patterns_per_exp": PER_TASK, "memory_strength": MARGIN}
        notes = ["memory of a task is filled at the end of its experience; QP through "
                 "qpsolvers(solver='quadprog')"]
        return GEM(patterns_per_exp=PER_TASK, memory_strength=MARGIN, **common), config, notes
    if args.stream == "mer":
        mer_common = dict(common, train_mb_size=1)
        config = {"strategy": "MER", "mem_size": MEMORY, "batch_size_mem": REPLAY,
                  "n_inner_steps": MER_CFG["batches_per_example"], "beta": MER_CFG["beta"],
                  "gamma": MER_CFG["gamma"], "train_mb_size": 1}
        notes = ["train_mb_size=1: avalanche's MER takes one incoming example per "
                 "minibatch, so ms_per_step covers 10 of its iterations",
                 "the reservoir is updated at the end of each experience, not per example; "
                 "memories drawn without replacement",
                 "avalanche evaluates the minibatch loss once more after each outer update"]
        strategy = MER(mem_size=MEMORY, batch_size_mem=REPLAY,
                       n_inner_steps=MER_CFG["batches_per_example"], beta=MER_CFG["beta"],
                       gamma=MER_CFG["gamma"], **mer_common)
        return strategy, config, notes
    if args.stream == "lamaml":
        glances = LAMAML_CFG["glances"]

        class GlancingLaMAML(LaMAML):
            """avalanche's LaMAML (v2) with ``glances`` inner+outer updates per minibatch,
            each drawing its own replay batch."""

            def _outer_update(self, **kwargs):
                super()._outer_update(**kwargs)
                for _ in range(glances - 1):
                    self._inner_updates(**kwargs)
                    super()._outer_update(**kwargs)

        lamaml_common = dict(common)
        lamaml_common.pop("eval_every")
        config = {"strategy": "LaMAML (avalanche.training.supervised.lamaml_v2) + glances",
                  "n_inner_updates": BATCH, "second_order": False,
                  "grad_clip_norm": LAMAML_CFG["grad_clip_norm"], "learn_lr": True,
                  "lr_alpha": LAMAML_CFG["lr_eta"], "sync_update": False,
                  "alpha_init": LAMAML_CFG["alpha_init"], "max_buffer_size": MEMORY,
                  "buffer_mb_size": REPLAY, "glances": glances}
        notes = ["glances by a subclass repeating inner+outer updates per minibatch "
                 "(avalanche has no glances option); the batch is not reshuffled between "
                 "glances",
                 "the reservoir is updated at the end of each experience (no replay during "
                 "the first task); memories drawn without replacement",
                 "inner steps use alpha, not max(alpha, 0), and clamp each inner gradient "
                 "entry to +-2",
                 "avalanche evaluates the minibatch loss once more after each update"]
        strategy = GlancingLaMAML(
            n_inner_updates=BATCH, second_order=False,
            grad_clip_norm=LAMAML_CFG["grad_clip_norm"], learn_lr=True,
            lr_alpha=LAMAML_CFG["lr_eta"], sync_update=False, alpha_init=LAMAML_CFG["alpha_init"],
            max_buffer_size=MEMORY, buffer_mb_size=REPLAY, eval_every=-1, **lamaml_common,
        )
        return strategy, config, notes
    raise ValueError(f"unknown stream {args.stream!r}")


def run_avalanche(args, x, y) -> tuple[list[float], dict]:
    import torch
    from avalanche.benchmarks import tensors_benchmark

    test = [(x[t, :BATCH], y[t, :BATCH]) for t in range(args.tasks)]
    benchmark = tensors_benchmark(
        train_tensors=[(x[t], y[t]) for t in range(args.tasks)],
        test_tensors=test,
        task_labels=list(range(args.tasks)),
    )
    model = make_mlp()
    strategy, config, notes = avalanche_strategy(args, model)
    times = []
    for t, experience in enumerate(benchmark.train_stream):
        start = time.perf_counter()
        strategy.train(experience, num_workers=0)
        times.append(time.perf_counter() - start)
        log(f"  task {t}: {times[-1]:.2f} s")
    for p in model.parameters():
        if not torch.isfinite(p).all():
            raise SystemExit("stream.py: non-finite parameters after training")
    return times, {"avalanche": config, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    set_threads(args.threads)
    torch.manual_seed(args.seed)
    x, y = make_stream(args.tasks, args.rows, args.seed)
    log(f"stream {args.stream} {args.impl}: {args.tasks} tasks x {args.rows} rows")
    if args.impl == "torch":
        times, extra = run_torch(args, x, y)
        libraries = {}
    else:
        times, extra = run_avalanche(args, x, y)
        libraries = {"avalanche": "avalanche-lib"}
    steps = args.rows // BATCH
    timed = sum(times[1:])

    config = {"tasks": args.tasks, "rows": args.rows, "batch": BATCH, "hidden": HIDDEN,
              "layers": 2, "lr": LR, "seed": args.seed, "learner": args.stream}
    if args.stream in ("er", "mer", "lamaml"):
        config.update(memory=MEMORY, replay_batch=REPLAY)
    if args.stream in ("agem", "gem"):
        config.update(memory_per_task=PER_TASK)
    if args.stream == "agem":
        config.update(ref_batch=REF_BATCH)
    if args.stream == "gem":
        config.update(memory_strength=MARGIN)
    if args.stream == "mer":
        config.update(MER_CFG)
    if args.stream == "lamaml":
        config.update(LAMAML_CFG)
        config["inner_steps"] = BATCH
        del config["lr"]
    config.update(extra)
    record = {
        "bench": args.stream,
        "impl": args.impl,
        "config": config,
        "samples_per_s": steps * BATCH * (args.tasks - 1) / timed,
        "ms_per_step": 1000 * timed / (steps * (args.tasks - 1)),
        "task_s": times,
        "compile_s": times[0],  # no compile in torch: the first task's wall time
    }
    emit(record, threads=args.threads, libraries=libraries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
