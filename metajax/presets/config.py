"""The meta-learning run configuration: every field a ``metajax train`` run is built from,
each a ``--set`` key, with its validation (the algorithm, data set, solver and model choices
come from the modules that define them)."""

from __future__ import annotations

import dataclasses

from metajax.data.omniglot import SPLIT_PROTOCOLS as OMNIGLOT_SPLITS
from metajax.meta.imaml import BACKWARD_SOLVERS, INNER_PROBLEMS, INNER_SOLVERS
from metajax.nn.conv4 import INITS, NORMS, READOUTS
from metajax.nn.precision import COMPUTE_DTYPES
from metajax.train.config import ConfigError, FlatConfig

DATASETS = ("sinusoid", "omniglot", "miniimagenet")
OUTER_OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
ON_NAN = ("stop", "skip")
MAX_ELEMENTS = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Config(FlatConfig):
    """Everything that defines a run. ``metajax train --set key=value`` sets any field.

    Attributes:
      preset: the preset this configuration started from.
      dataset: ``sinusoid``, ``omniglot`` or ``miniimagenet``.
      algorithm: one of ``maml``, ``fomaml``, ``reptile``, ``metasgd``, ``anil``, ``imaml``,
        ``mamlpp``.
      ways: classes per task (N) for classification; unused by sinusoid.
      shots: support examples per task (K); per class for classification.
      queries: query examples per task (per class for classification) in training.
      meta_batch_size: tasks per meta-step.
      inner_lr: inner-loop step size (alpha); Meta-SGD's initial per-parameter rate.
      inner_steps: inner-loop steps in training.
      outer_lr: outer (meta) learning rate (beta).
      outer_optimizer: ``adam`` or ``sgd``.
      outer_lr_schedule: ``constant``, ``linear`` decay to zero over the run, or ``cosine``
        decay to ``outer_lr / 100`` over the run (MAML++'s CA).
      steps: meta-steps (outer updates).
      seed: seeds initialisation, tasks and everything random in the run.
      hidden: width of each hidden layer of the MLP.
      layers: number of hidden layers of the MLP.
      log_every: meta-steps compiled into one call; metrics are logged once per call.
      eval_every: meta-steps between validation evaluations (0: only at the end).
      eval_tasks: tasks per validation evaluation.
      eval_queries: query examples per task (per class) at evaluation.
      eval_inner_steps: inner steps at validation and test (0: ``inner_steps``).
      remat: rematerialise MAML's inner steps in the backward pass (less memory).
      lam: iMAML's proximal strength lambda.
      cg_steps: iMAML's conjugate-gradient iterations (with ``backward_solver=gmres``: its
        Hessian-vector products).
      backward_solver: iMAML's solver of the backward system, ``cg`` (conjugate gradient)
        or ``gmres`` (:func:`metajax.gmres_solver`, restarted GMRES, which converges where
        the system is indefinite and CG need not).
      cg_damping, lam_damping: iMAML's backward-system stabilisers, see :func:`metajax.imaml`.
      inner_solver: iMAML's inner solver, ``gd`` (fixed steps of ``inner_lr``) or
        ``backtracking`` (steps that shrink when the proximal loss would not fall).
      inner_problem: iMAML's inner problem in training, ``proximal`` (the paper's) or
        ``released`` (the authors' released loop: free steps, then one step back towards
        theta); see :func:`metajax.imaml`.
      eval_lam: iMAML's proximal strength at validation and test (-1: ``lam``; 0: free
        steps on the support loss, as the authors' released evaluation).
      grad_report_tasks: iMAML only: at every validation, check the meta-gradient on this
        many validation tasks (the same ones each time; 0: off) and log ``diag_*`` figures
        (``||phi - theta||``, its cosines with the plain query gradient and with an accurate
        implicit gradient; :func:`metajax.implicit_gradient_report`). It does not change
        training, but its time counts towards ``time_budget_s``.
      grad_report_hvps: Hessian-vector products of that accurate solve, per task.
      adam_eps: the outer Adam's epsilon (optax's default 1e-8; iMAML's released code 1e-3).
      msl: MAML++ multi-step loss.
      lslr: MAML++ learnable per-layer per-step inner learning rates.
      bnwb: MAML++ per-step batch-norm scale and bias (meta-learned, one copy per inner step).
      iters_per_epoch: meta-steps per MAML++ "epoch" (its schedules count epochs).
      msl_anneal_epochs: epochs over which MSL weights move to the final step.
      first_order_epochs: MAML++ derivative-order annealing: first order for this many
        epochs, then second order (0: second order throughout).
      time_budget_s: stop after the first chunk that ends past this many seconds of training
        (0: no budget); the run is then shorter than ``steps`` and says so.
      data_dir: dataset folder (empty: ``$METAJAX_DATA_DIR``, else the user cache).
      norm: Conv4 normalisation: ``batch`` (current-batch statistics in training and
        evaluation, as the MAML reference: transductive), ``layer`` (per-example statistics:
        non-transductive) or ``none``.
      pooling: Omniglot Conv4 with stride-1 convolutions and 2x2 max-pooling (MAML++'s
        reference network) instead of MAML's stride-2 convolutions.
      norm_eps: the Conv4 normalisation's epsilon (1e-3 as the MAML reference; 1e-5 as
        PyTorch's default in the MAML++ and iMAML references).
      weight_init: Conv4 initialisation, ``glorot`` (Glorot-uniform, the MAML reference) or
        ``imaml`` (iMAML's released network: Xavier-uniform gain 1.73, biases U(0, 0.05)).
      readout: Conv4 features for the head, ``flatten`` (every position; iMAML's released
        code) or ``mean`` (averaged over positions; the MAML reference for Omniglot).
      split: Omniglot protocol, ``maml`` (1,200 training characters with rotations) or
        ``alphabets`` (background / evaluation alphabets); see ``metajax.data.omniglot``.
      grad_clip_norm: clip the outer (meta-)gradient to this global norm before the outer
        optimiser (0: no clipping).
      on_nan: a meta-step whose loss, parameters or optimiser state would become NaN or
        infinite is never applied; ``stop`` then ends the run (exit status 2, the last good
        checkpoint kept), ``skip`` goes on and counts the skipped steps.
      checkpoint_every: meta-steps between checkpoints of the whole training state (0: by
        time only); rounded up to the end of a logging chunk.
      checkpoint_seconds: seconds between checkpoints (0: by step count only). A checkpoint
        is also written at the end, at each validation and on SIGINT / SIGTERM.
      keep_checkpoints: how many of the latest checkpoints to keep (the best one by
        validation is kept too).
      devices: devices each meta-batch is spread over; ``meta_batch_size`` must be a
        multiple of it (0: the most visible devices that divide ``meta_batch_size``; with
        several processes, all of their devices). The result does not depend on it (up to
        float rounding); ``config.json`` records the count used.
      compute_dtype: ``float32``, or ``bfloat16`` to run the model's forward and backward
        passes in bfloat16 while the meta-parameters, optimiser state, normalisation
        statistics and losses stay float32 (mixed precision).

    The stopping criteria (``steps``, ``time_budget_s``), where the data lives and how the
    run guards and checkpoints itself (:attr:`RUN_CONTROL`) can change when a run is resumed;
    every other field is part of the configuration's :meth:`fingerprint`.
    """

    RUN_CONTROL = ("steps", "time_budget_s", "data_dir", "on_nan", "checkpoint_every",
                   "checkpoint_seconds", "keep_checkpoints", "devices", "grad_report_tasks",
                   "grad_report_hvps")
    LATER_FIELDS = (
        (("backward_solver", "cg"),),
        (("weight_init", "glorot"),),
        (("inner_problem", "proximal"), ("eval_lam", -1.0), ("adam_eps", 1e-8),
         ("pooling", False), ("norm_eps", 1e-3)),
    )

    preset: str = "custom"
    dataset: str = "sinusoid"
    algorithm: str = "maml"
    ways: int = 5
    shots: int = 10
    queries: int = 10
    meta_batch_size: int = 25
    inner_lr: float = 0.01
    inner_steps: int = 1
    outer_lr: float = 1e-3
    outer_optimizer: str = "adam"
    outer_lr_schedule: str = "constant"
    steps: int = 70_000
    seed: int = 0
    hidden: int = 40
    layers: int = 2
    log_every: int = 100
    eval_every: int = 5_000
    eval_tasks: int = 100
    eval_queries: int = 100
    eval_inner_steps: int = 0
    remat: bool = False
    lam: float = 2.0
    cg_steps: int = 5
    cg_damping: float = 0.0
    backward_solver: str = "cg"
    lam_damping: float = 0.0
    inner_solver: str = "gd"
    inner_problem: str = "proximal"
    eval_lam: float = -1.0
    grad_report_tasks: int = 0
    grad_report_hvps: int = 200
    adam_eps: float = 1e-8
    msl: bool = True
    lslr: bool = True
    bnwb: bool = False
    iters_per_epoch: int = 500
    msl_anneal_epochs: int = 10
    first_order_epochs: int = 0
    time_budget_s: float = 0.0
    data_dir: str = ""
    split: str = "maml"
    norm: str = "batch"
    readout: str = "flatten"
    pooling: bool = False
    norm_eps: float = 1e-3
    weight_init: str = "glorot"
    grad_clip_norm: float = 0.0
    on_nan: str = "stop"
    checkpoint_every: int = 0
    checkpoint_seconds: float = 300.0
    keep_checkpoints: int = 3
    devices: int = 0
    compute_dtype: str = "float32"

    def validate(self) -> Config:
        """Check every field; raise :class:`ConfigError` naming the field and the fix."""
        from metajax.presets.build import ALGORITHMS  # the registry of meta-learners

        self.check_types()
        if self.dataset != "sinusoid" and self.ways < 2:
            raise ConfigError(f"ways must be >= 2 for classification, got {self.ways!r}")
        self.check_bounds(
            positive=(
                "shots", "queries", "meta_batch_size", "inner_lr", "inner_steps", "outer_lr",
                "steps", "hidden", "layers", "log_every", "eval_tasks", "eval_queries", "lam",
                "cg_steps", "iters_per_epoch", "msl_anneal_epochs", "keep_checkpoints",
                "adam_eps", "norm_eps", "grad_report_hvps",
            ),
            non_negative=(
                "first_order_epochs", "eval_inner_steps", "eval_every", "time_budget_s", "seed",
                "cg_damping", "lam_damping", "grad_clip_norm", "checkpoint_every",
                "checkpoint_seconds", "devices", "grad_report_tasks",
            ),
            choices={
                "dataset": DATASETS,
                "algorithm": ALGORITHMS,
                "split": OMNIGLOT_SPLITS,
                "outer_optimizer": OUTER_OPTIMIZERS,
                "outer_lr_schedule": SCHEDULES,
                "norm": NORMS,
                "readout": READOUTS,
                "weight_init": INITS,
                "inner_solver": INNER_SOLVERS,
                "backward_solver": BACKWARD_SOLVERS,
                "inner_problem": INNER_PROBLEMS,
                "on_nan": ON_NAN,
                "compute_dtype": tuple(COMPUTE_DTYPES),
            },
        )
        per_batch = self.meta_batch_size * max(self.ways, 1) * max(
            self.shots + self.queries, self.shots + self.eval_queries)
        if per_batch > MAX_ELEMENTS:
            raise ConfigError(
                f"a meta-batch of {self.meta_batch_size} tasks x {self.ways} ways x "
                f"{self.shots}+{max(self.queries, self.eval_queries)} examples is {per_batch} "
                f"examples, more than this machine can index ({MAX_ELEMENTS}); lower "
                "meta_batch_size, shots or queries"
            )
        if self.inner_solver != "gd" and self.algorithm != "imaml":
            raise ConfigError(f"inner_solver={self.inner_solver!r} applies to imaml only; "
                              f"{self.algorithm} takes plain gradient steps")
        if self.backward_solver != "cg" and self.algorithm != "imaml":
            raise ConfigError(f"backward_solver={self.backward_solver!r} applies to imaml only")
        if self.algorithm != "imaml" and (self.inner_problem != "proximal"
                                          or self.eval_lam != -1.0):
            raise ConfigError("inner_problem and eval_lam apply to imaml only; leave them at "
                              f"their defaults for {self.algorithm}")
        if self.grad_report_tasks and self.algorithm != "imaml":
            raise ConfigError(f"grad_report_tasks applies to imaml only (it checks the implicit "
                              f"meta-gradient); leave it at 0 for {self.algorithm}")
        if self.pooling and self.dataset != "omniglot":
            raise ConfigError("pooling applies to the Omniglot Conv4 only (mini-ImageNet's "
                              "Conv4 always pools)")
        if self.eval_lam != -1.0 and self.eval_lam < 0:
            raise ConfigError(f"eval_lam must be >= 0, or -1 for lam; got {self.eval_lam!r}")
        return self

    def run_control(self) -> tuple[str, ...]:
        """:attr:`RUN_CONTROL`, less ``steps`` when the outer learning rate decays over the
        run's steps (then ``steps`` changes the result)."""
        if self.outer_lr_schedule != "constant":
            return tuple(k for k in self.RUN_CONTROL if k != "steps")
        return self.RUN_CONTROL

    def field_notes(self) -> dict[str, str]:
        """What the fields holding a "same as" / "none" value (0, -1, empty) resolve to, and
        the fields this configuration's algorithm or data set does not read, by field name:
        what ``metajax presets NAME`` prints beside them."""
        notes = {}
        if not self.eval_inner_steps:
            notes["eval_inner_steps"] = f"0: inner_steps, {self.inner_steps}"
        if not self.eval_every:
            notes["eval_every"] = "0: only at the end"
        if not self.time_budget_s:
            notes["time_budget_s"] = "0: no time limit"
        if not self.grad_clip_norm:
            notes["grad_clip_norm"] = "0: no clipping"
        if not self.checkpoint_every:
            notes["checkpoint_every"] = "0: by time only"
        if not self.devices:
            notes["devices"] = "0: the most visible devices that divide meta_batch_size"
        if not self.data_dir:
            notes["data_dir"] = "empty: $METAJAX_DATA_DIR, else the user cache"
        if self.algorithm == "imaml" and self.eval_lam == -1.0:
            notes["eval_lam"] = f"-1: lam, {self.lam:g}"
        if self.algorithm == "imaml" and not self.grad_report_tasks:
            notes["grad_report_tasks"] = "0: no meta-gradient check at validation"
        unused = []
        if self.dataset == "sinusoid":
            unused += ["ways", "split", "norm", "readout", "pooling", "norm_eps", "weight_init"]
        else:
            unused += ["hidden", "layers"]
        if self.dataset != "omniglot":
            unused += ["split", "pooling"]
        if self.algorithm != "imaml":
            unused += ["lam", "cg_steps", "cg_damping", "lam_damping", "inner_solver",
                       "backward_solver",
                       "inner_problem", "eval_lam", "grad_report_tasks", "grad_report_hvps"]
        if self.algorithm != "mamlpp":
            unused += ["msl", "lslr", "bnwb", "iters_per_epoch", "msl_anneal_epochs",
                       "first_order_epochs"]
        if self.algorithm != "maml":
            unused.append("remat")
        if self.outer_optimizer != "adam":
            unused.append("adam_eps")
        for name in unused:
            notes.setdefault(name, f"not used by {self.algorithm} on {self.dataset}")
        return notes

    @property
    def test_inner_steps(self) -> int:
        """Inner steps at validation and test."""
        return self.eval_inner_steps or self.inner_steps
