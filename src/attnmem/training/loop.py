"""Train a small ``attnmem.nn.Transformer`` on a task: accuracy, loss, peak memory, tokens/s.

``fit(TrainConfig(...))`` runs AdamW with linear warmup and cosine decay, evaluates on a
fixed held-out split every ``eval_every`` steps, and saves a checkpoint every
``checkpoint_every`` steps. A checkpoint holds the model, optimizer and scheduler states, the
global torch RNG state, the data generator's state, the step and the metrics so far, and is
written atomically with a checksum (``training.checkpoint``), so an interruption at any
moment leaves the previous checkpoint intact and a corrupted one is refused.
``fit(..., resume=True)`` continues from it and reaches the same weights and metrics as an
uninterrupted run with the same seed; without a checkpoint to continue, it refuses.
"""


from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import masks as M
from .. import registry
from ..checks import check_positive_fields, check_positive_int
from ..memory.measure import MiB, measure
from ..nn import Transformer
from ..nn.attention import ROTARY_BASE, check_rotary_base
from ..nn.transformer import POSITIONS
from ..tasks import IGNORE, make_task
from .checkpoint import load_checkpoint, save_atomic

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
EVAL_SEED_OFFSET = 1_000_003  # the held-out split's generator seed is seed + this
MASK_WINDOW = "mask_window"  # a method-spec key handled here: a causal sliding-window mask
# Settings that may differ between a run and its resumption. Changing ``steps`` extends (or
# shortens) a run: the cosine schedule follows the new total from there on, so only an
# unchanged ``steps`` reproduces an uninterrupted run exactly.
RESUMABLE_FIELDS = ("steps", "out_dir", "checkpoint_every", "target_accuracy", "max_time_s")
# Fields added after checkpoints were already written, with the value that reproduces those runs.
ADDED_FIELDS = {"window_warmup": 0, "window_start": 32, "positions": "sinusoidal", "context_warmup": 0,
                "context_start": 128, "length_scale": False, "alibi": False,
                "rotary_base": ROTARY_BASE}


@dataclass
class TrainConfig:
    """Everything that decides a training run (and so must match when resuming).

    Args:
        task, task_options: a name from ``attnmem.tasks.TASKS`` and its options.
        train_mix: extra training distributions, each a dict of task-option overrides (``seq_len``
            included; the vocabulary stays): every step draws its batch uniformly from the task
            and these, with batch_size · seq_len tokens per batch (shorter sequences, more of
            them). Zoology trains MQAR on such a mixture (N = 64 with 4 pairs up to N = 256).
            Evaluation is always on the task itself.
        seq_len: tokens per example (ListOps: the padded ``max_length``).
        method, method_options: the attention method and its options (``mask_window=W`` in
            ``method_options`` adds a causal sliding-window mask of W keys instead).
        window_warmup, window_start: the first ``window_warmup`` training steps attend only to the
            last W keys of each query (a causal sliding-window mask on top of the run's own),
            W = ``window_start`` and then doubling, in equal stages, up to seq_len / 2. At the
            start attention is nearly uniform over all earlier positions, so over a long window
            the gradient that teaches a head to read the last few tokens is diluted by the
            window's length (a context-1024 byte model stays at bigram quality for hundreds of
            steps); the narrow window learns that first, at every position of the full window,
            and each doubling adds keys the heads have not yet seen at most twice over.
            Evaluation always uses the run's own mask. 0 (the default) turns it off.
        context_warmup, context_start: sequence-length warm-up. The first ``context_warmup``
            training steps train on shorter windows of the same text: ``context_start`` tokens,
            then doubling in equal stages, below seq_len; a stage of length L draws
            batch_size · seq_len / L windows, so every step has the same tokens. At equal tokens a
            long window is fewer, more correlated examples per step (8 windows of 1024 bytes
            against 64 of 128): the short stages learn the local statistics from many places
            first, and the model then learns to read further back. It needs positions that carry
            over to longer windows (``positions="rotary"``: scores depend only on offsets).
            After the warm-up, ``train_mix`` (if any) applies. Evaluation is always at seq_len.
            0 (the default) turns it off.
        d_model, n_heads, n_layers: model shape.
        positions: "sinusoidal" (added to the input) or "rotary" (q and k rotated in every
            attention layer); see ``attnmem.nn.Transformer``. The text ``target`` preset uses rotary:
            with sinusoidal positions its context-1024 byte model stayed at bigram quality.
        rotary_base: the base of the rotary angles (10000, RoFormer's; positions="rotary" only).
        length_scale: Scalable-Softmax in every attention layer (``attnmem.nn.Transformer``).
        alibi: ALiBi's fixed distance penalty in every attention layer (``attnmem.nn.Transformer``).
        tie_embeddings: read out with the token embedding (scaled by d_model^-1/2) instead of a
            separate output matrix (language-model tasks only).
        batch_size, steps, lr, weight_decay, warmup_steps, grad_clip: optimisation.
        eval_every, eval_examples: held-out evaluation cadence and size.
        checkpoint_every: steps between checkpoints (only with ``out_dir``).
        checkpointing: activation checkpointing in every block.
        target_accuracy: stop at the first evaluation whose held-out accuracy reaches this
            (the metrics then record ``target_step`` and ``target_wall_s``); None trains all steps.
        max_time_s: stop after the first step that ends past this many wall seconds of the run.
        seed: model initialisation, training data and (offset) held-out data.
        out_dir: where checkpoints and ``metrics.jsonl`` go; None keeps nothing on disk.

    Raises:
        ValueError: an option out of range, an unknown task, method or option.
    """

    task: str = "mqar"
    task_options: dict[str, Any] = field(default_factory=dict)
    train_mix: list[dict[str, Any]] = field(default_factory=list)
    seq_len: int = 256
    method: str = "chunked"
    method_options: dict[str, Any] = field(default_factory=dict)
    window_warmup: int = 0
    window_start: int = 32
    context_warmup: int = 0
    context_start: int = 128
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    positions: str = "sinusoidal"
    rotary_base: float = ROTARY_BASE
    length_scale: bool = False
    alibi: bool = False
    tie_embeddings: bool = False
    batch_size: int = 32
    steps: int = 1000
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_examples: int = 256
    checkpoint_every: int = 100
    checkpointing: bool = False
    target_accuracy: float | None = None
    max_time_s: float | None = None
    seed: int = 0
    out_dir: str | None = None

    def __post_init__(self):
        check_positive_fields(self, ("seq_len", "d_model", "n_heads", "n_layers", "batch_size", "steps",
                                     "eval_every", "eval_examples", "checkpoint_every"))
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        for name in ("warmup_steps", "window_warmup", "context_warmup"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 0:
                raise ValueError(f"{name} must be an int >= 0, got {val!r}")
        check_positive_int("window_start", self.window_start)
        check_positive_int("context_start", self.context_start)
        if self.context_warmup and self.context_start >= self.seq_len:
            raise ValueError(f"context_start must be below seq_len ({self.seq_len}) for a context warm-up, "
                             f"got {self.context_start}")
        if self.context_warmup and self.positions != "rotary":
            raise ValueError("context_warmup needs positions='rotary' (sinusoidal positions beyond the "
                             f"warm-up's windows would be unseen in training), got positions={self.positions!r}")
        check_rotary_base(self.rotary_base)
        if self.rotary_base != ROTARY_BASE and self.positions != "rotary":
            raise ValueError(f"rotary_base needs positions='rotary', got positions={self.positions!r}")
        if not isinstance(self.length_scale, bool):
            raise ValueError(f"length_scale must be a bool, got {self.length_scale!r}")
        if not isinstance(self.alibi, bool):
            raise ValueError(f"alibi must be a bool, got {self.alibi!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.target_accuracy is not None and not (isinstance(self.target_accuracy, (int, float))
                                                     and 0 < self.target_accuracy <= 1):
            raise ValueError(f"target_accuracy must be in (0, 1], got {self.target_accuracy!r}")
        if self.max_time_s is not None and not (isinstance(self.max_time_s, (int, float)) and self.max_time_s > 0):
            raise ValueError(f"max_time_s must be a positive number of seconds, got {self.max_time_s!r}")
        window = self.method_options.get(MASK_WINDOW)
        if window is not None:
            check_positive_int(MASK_WINDOW, window)
        target = make_task(self.task, seq_len=self.seq_len, **self.task_options)  # validates the task options
        if self.tie_embeddings and (target.kind != "lm" or target.num_outputs != target.vocab_size):
            raise ValueError(f"tie_embeddings needs a language-model task with one output per token; {self.task} "
                             f"has {target.num_outputs} outputs for {target.vocab_size} tokens")
        warmup_lengths = sorted({self.warmup_context(i) for i in range(self.context_warmup)})  # validated as the mix
        for overrides in [*self.train_mix, *({"seq_len": n} for n in warmup_lengths)]:
            mixed = self.mix_task(overrides)
            if (mixed.vocab_size, mixed.num_outputs) != (target.vocab_size, target.num_outputs):
                raise ValueError(f"train_mix entry {overrides!r} changes the vocabulary or outputs "
                                 f"({mixed.vocab_size}, {mixed.num_outputs}); expected "
                                 f"({target.vocab_size}, {target.num_outputs}) as the task's")
        info = registry.get(self.method)  # raises on an unknown name
        info.make_options(self.attention_options())  # raises on an unknown or bad option

    def mix_task(self, overrides: dict[str, Any]):
        """The task of one ``train_mix`` entry: the task's options with ``overrides`` applied."""
        if not isinstance(overrides, dict):
            raise ValueError(f"train_mix entries must be dicts of task options, got {overrides!r}")
        opts = {**self.task_options, **overrides}
        seq_len = opts.pop("seq_len", self.seq_len)
        return make_task(self.task, seq_len=seq_len, **opts)

    def training_sources(self) -> list[tuple[Any, int]]:
        """(task, batch size) of every training distribution: the task first, then ``train_mix``."""
        sources = [(make_task(self.task, seq_len=self.seq_len, **self.task_options), self.batch_size)]
        for overrides in self.train_mix:
            task = self.mix_task(overrides)
            n = getattr(task, "seq_len", None) or getattr(task, "max_length", self.seq_len)
            sources.append((task, self.batch_at(n)))
        return sources

    def warmup_context(self, step: int) -> int | None:
        """The window length of training step ``step`` (0-based) under ``context_warmup``; None
        once it is over (the run's own seq_len)."""
        return _doubling_stage(step, self.context_warmup, self.context_start, self.seq_len)

    def batch_at(self, length: int) -> int:
        """Windows of ``length`` tokens per batch with the run's tokens per batch (at least one)."""
        return max(1, self.batch_size * self.seq_len // length)

    def attention_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.method_options.items() if k != MASK_WINDOW}

    def mask(self) -> M.Mask | None:
        window = self.method_options.get(MASK_WINDOW)
        return None if window is None else M.sliding_window(window - 1, 0)

    def warmup_window(self, step: int) -> int | None:
        """The attention window (keys per query) of training step ``step`` (0-based) under
        ``window_warmup``; None once it is over (or when the window would cover the sequence)."""
        if self.window_start >= self.seq_len:
            return None
        return _doubling_stage(step, self.window_warmup, self.window_start, self.seq_len)

    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.method_options.items()))
        return f"{self.method}:{opts}" if opts else self.method



def _doubling_stage(step: int, steps: int, start: int, limit: int) -> int | None:
    """The stage of a warm-up of ``steps`` steps at step ``step`` (0-based): ``start``, doubling
    below ``limit``, in equal stages; None once the warm-up is over."""
    if step >= steps:
        return None
    stages = [start]
    while stages[-1] * 2 < limit:
        stages.append(stages[-1] * 2)
    return stages[step * len(stages) // steps]


# --- model -------------------------------------------------------------------------------

class TaskModel(nn.Module):
    """A ``Transformer`` plus the task's readout: per-token logits, or for classification the
    head applied to the hidden state of the last non-pad token (the model is causal, so that
    token has seen the whole expression)."""

    def __init__(self, config: TrainConfig, task: Any):
        super().__init__()
        self.kind = task.kind
        self.net = Transformer(task.vocab_size, config.d_model, config.n_heads, config.n_layers,
                               num_outputs=task.num_outputs, method=config.method, causal=True,
                               checkpointing=config.checkpointing, positions=config.positions,
                               rotary_base=config.rotary_base, length_scale=config.length_scale,
                               alibi=config.alibi,
                               **config.attention_options())
        self.attn_mask = config.mask()
        self.tied = config.tie_embeddings
        if self.tied:  # the readout is the token embedding, scaled; the head keeps only its bias
            del self.net.head.weight
            self.net.head.register_parameter("weight", None)

    def readout(self, hidden: Tensor) -> Tensor:
        """(..., d_model) -> (..., outputs): the head, or with ``tie_embeddings`` the token embedding
        (scaled by d_model^-1/2, so that the initial logits have unit scale) plus the head's bias."""
        if not self.tied:
            return self.net.head(hidden)
        return hidden @ self.net.embed.weight.T * self.net.d_model ** -0.5 + self.net.head.bias

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = self.net.hidden(tokens, mask=self.attn_mask)  # (B, N, d_model)
        if self.kind == "classify":
            last = (tokens != 0).sum(1).clamp(min=1) - 1  # (B,) index of the last non-pad token
            hidden = hidden[torch.arange(tokens.shape[0]), last]  # (B, d_model)
        return self.readout(hidden)  # (B, N, C) or (B, C)

    def scored(self, tokens: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and targets of the labelled predictions only: (M, C) and (M,).

        For a language-model task only the positions with a label go through the output head,
        which is all the loss needs; MQAR labels 16 of 256 positions, so a large vocabulary
        (Zoology's 8192) costs 16× less there than full logits would.
        """
        if self.kind == "classify":
            return self(tokens), labels  # (B, C), (B,)
        hidden = self.net.hidden(tokens, mask=self.attn_mask)  # (B, N, d_model)
        keep = labels != IGNORE  # (B, N)
        return self.readout(hidden[keep]), labels[keep]  # (M, C), (M,)


def loss_and_correct(logits: Tensor, labels: Tensor) -> tuple[Tensor, int, int]:
    """Mean cross-entropy over labelled positions, and (correct, counted) predictions."""
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (B·N, C) or (B, C)
    flat_labels = labels.reshape(-1)
    loss = nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE)
    keep = flat_labels != IGNORE
    correct = int((flat_logits.argmax(-1)[keep] == flat_labels[keep]).sum())
    return loss, correct, int(keep.sum())


def training_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """``loss_and_correct``'s loss alone (no argmax over the outputs: the training step needs none)."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def evaluate(model: TaskModel, inputs: Tensor, labels: Tensor, batch_size: int) -> dict[str, float]:
    """Loss and accuracy on the held-out split (per labelled token, or per example)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, counted = 0.0, 0, 0
    for a in range(0, inputs.shape[0], batch_size):
        loss, c, n = loss_and_correct(*model.scored(inputs[a:a + batch_size], labels[a:a + batch_size]))
        loss_sum += float(loss) * n
        correct += c
        counted += n
    model.train(was_training)
    return {"eval_loss": loss_sum / max(counted, 1), "eval_accuracy": correct / max(counted, 1)}


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to 10 % of ``lr`` at ``steps``."""
    def fn(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return fn


def build(config: TrainConfig) -> tuple[Any, TaskModel, torch.optim.Optimizer, Any]:
    """Task, model, AdamW and scheduler for a config (the model initialised from ``seed``)."""
    task = make_task(config.task, seq_len=config.seq_len, **config.task_options)
    torch.manual_seed(config.seed)
    model = TaskModel(config, task)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                            betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config))
    return task, model, opt, sched



# --- the loop ----------------------------------------------------------------------------

def resume_key(config: TrainConfig) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it (all but
    ``RESUMABLE_FIELDS``)."""
    d = dataclasses.asdict(config)
    for key in RESUMABLE_FIELDS:
        d.pop(key)
    return d


def step_peak(model: TaskModel, opt: torch.optim.Optimizer, inputs: Tensor, labels: Tensor) -> tuple[int, float]:
    """Peak bytes and time of one full training step (forward, backward, AdamW update) in the
    steady state, measured with ``attnmem.measure`` on copies, so the run itself is untouched:
    an untracked step first creates AdamW's moments, then parameters and moments count from
    the start of the tracked step; gradients and activations as they appear."""
    model, opt = copy.deepcopy((model, opt))
    params = [p for p in model.parameters()]

    def one_step(params, state, inputs, labels):
        opt.zero_grad(set_to_none=True)
        loss, _, _ = loss_and_correct(*model.scored(inputs, labels))
        loss.backward()
        opt.step()

    if not opt.state:
        one_step(params, [], inputs, labels)
    opt.zero_grad(set_to_none=True)
    state = [t for st in opt.state.values() for t in st.values() if isinstance(t, Tensor) and t.dim() > 0]
    m = measure(one_step, params, state, inputs, labels, repeats=0, warmup=0)
    return m.peak_bytes, m.time_s



def warmup_scored(model: TaskModel, window: int | None, inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``model.scored`` with attention narrowed to the last ``window`` keys (None: the model's own mask)."""
    if window is None:
        return model.scored(inputs, labels)
    own = model.attn_mask
    narrow = M.sliding_window(window - 1, 0)
    model.attn_mask = narrow if own is None else own & narrow
    try:
        return model.scored(inputs, labels)
    finally:
        model.attn_mask = own


@dataclass
class TrainResult:
    """The final metrics, every evaluation, and the model at the end."""

    config: TrainConfig
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    model: TaskModel


def fit(config: TrainConfig, *, resume: bool = False, stop_at: int | None = None,
        progress: bool = False) -> TrainResult:
    """Train (or continue) one run; see the module docstring.

    Args:
        config: the run.
        resume: continue from ``out_dir/checkpoint.pt`` when it exists.
        stop_at: stop after this step (a checkpoint is saved there), as an interruption would.
        progress: show a progress bar on stderr.

    Raises:
        ValueError: ``resume`` without ``out_dir``, or a checkpoint from a different config.
    """
    started = time.perf_counter()
    out = Path(config.out_dir) if config.out_dir else None
    if resume and out is None:
        raise ValueError("resume needs out_dir (where the checkpoint is)")
    task, model, opt, sched = build(config)
    data_gen = torch.Generator().manual_seed(config.seed)
    # A task with files of its own for evaluation (``text``) names them; the others draw held-out
    # examples from a generator of their own.
    eval_task = task.held_out() if hasattr(task, "held_out") else task
    eval_inputs, eval_labels = eval_task.sample(config.eval_examples,
                                           torch.Generator().manual_seed(config.seed + EVAL_SEED_OFFSET))
    step, history, peak_bytes, train_time, train_tokens = 0, [], None, 0.0, 0
    wall_before = 0.0  # wall seconds of the earlier sessions of a resumed run
    ckpt = out / CHECKPOINT if out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    if resume and not ckpt.exists():
        raise ValueError(f"resume: no checkpoint at {ckpt}; run without resume (--resume) to start from scratch")
    if resume:
        state = load_checkpoint(ckpt)
        saved = {**ADDED_FIELDS, **(state.get("config") or {})}  # a checkpoint from before a field existed
        if saved != resume_key(config):
            diff = sorted(k for k, v in resume_key(config).items() if saved.get(k) != v)
            raise ValueError(f"checkpoint {ckpt} was written by a different config (differs in: {', '.join(diff)})")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        data_gen.set_state(state["data_rng"])
        step, history, peak_bytes = state["step"], state["history"], state["peak_bytes"]
        train_time, train_tokens = state["train_time"], state["train_tokens"]
        wall_before = state.get("wall_s", 0.0)
    if out:  # metrics.jsonl mirrors the checkpoint's history, then grows line by line
        (out / METRICS).write_text("".join(json.dumps(h) + "\n" for h in history))

    def wall() -> float:
        return wall_before + time.perf_counter() - started

    def checkpoint() -> None:
        if ckpt is None:
            return
        save_atomic({"config": resume_key(config), "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                     "data_rng": data_gen.get_state(), "step": step, "history": history,
                     "peak_bytes": peak_bytes, "train_time": train_time, "train_tokens": train_tokens,
                     "wall_s": wall()}, ckpt)

    sources = config.training_sources()

    short_tasks: dict[int, Any] = {}  # the context warm-up's tasks, by window length

    def next_batch() -> tuple[Tensor, Tensor]:
        length = config.warmup_context(step)
        if length is not None:
            if length not in short_tasks:
                short_tasks[length] = config.mix_task({"seq_len": length})
            return short_tasks[length].sample(config.batch_at(length), data_gen)
        if len(sources) == 1:
            return task.sample(config.batch_size, data_gen)
        src, n = sources[int(torch.randint(len(sources), (1,), generator=data_gen))]
        return src.sample(n, data_gen)

    end = config.steps if stop_at is None else min(stop_at, config.steps)
    bar = _progress_bar(progress, config.label(), config.steps, step)
    last_loss = float("nan")
    try:
        while step < end and first_reaching(history, config.target_accuracy) is None:
            if peak_bytes is None:  # on a batch of the task itself, from a generator of its own
                peak_bytes = step_peak(model, opt, *task.sample(config.batch_size,
                                                                torch.Generator().manual_seed(config.seed)))[0]
            inputs, labels = next_batch()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = training_loss(*warmup_scored(model, config.warmup_window(step), inputs, labels))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            sched.step()
            train_time += time.perf_counter() - t0
            train_tokens += inputs.numel()
            step += 1
            last_loss = float(loss.detach())
            out_of_time = config.max_time_s is not None and wall() >= config.max_time_s
            if step % config.eval_every == 0 or step == config.steps or out_of_time:
                row = {"step": step, "train_loss": last_loss, **evaluate(model, eval_inputs, eval_labels,
                                                                          config.batch_size),
                       "peak_mib": peak_bytes / MiB, "tokens_per_s": train_tokens / max(train_time, 1e-9),
                       "train_time_s": train_time, "wall_s": wall()}
                history.append(row)
                if out:
                    with (out / METRICS).open("a") as f:
                        f.write(json.dumps(row) + "\n")
            reached = first_reaching(history, config.target_accuracy) is not None
            if step % config.checkpoint_every == 0 or step == end or reached or out_of_time:
                checkpoint()
            if reached or out_of_time:
                break
            if bar is not None:
                acc = history[-1]["eval_accuracy"] if history else float("nan")
                bar[0].update(bar[1], advance=1, description=f"{config.label()} loss {last_loss:.3f} acc {acc:.3f}")
    finally:
        if bar is not None:
            bar[0].stop()
    final = dict(history[-1]) if history and history[-1]["step"] == step else {"step": step, "train_loss": last_loss}
    final.update({"method": config.label(), "task": config.task, "seq_len": config.seq_len,
                  "batch_size": config.batch_size, "checkpointing": config.checkpointing,
                  "peak_mib": (peak_bytes or 0) / MiB, "tokens_per_s": train_tokens / max(train_time, 1e-9),
                  "train_time_s": train_time, "wall_s": wall(), "steps": step})
    if hasattr(task, "corpus"):  # text: bits per byte on the validation files, and which text it was
        final.update(task.corpus.describe())
        if "eval_loss" in final:
            final["eval_bpb"] = final["eval_loss"] / math.log(2)
    if config.target_accuracy is not None:
        hit = first_reaching(history, config.target_accuracy)
        final.update({"target_accuracy": config.target_accuracy, "target_step": hit and hit["step"],
                      "target_wall_s": hit and hit.get("wall_s"), "target_train_time_s": hit and hit["train_time_s"]})
    return TrainResult(config, final, history, model)


def first_reaching(history: list[dict[str, Any]], accuracy: float | None) -> dict[str, Any] | None:
    """The first evaluation whose held-out accuracy is at least ``accuracy`` (None: none, or no target)."""
    if accuracy is None:
        return None
    return next((h for h in history if h["eval_accuracy"] >= accuracy), None)


def _progress_bar(enabled: bool, label: str, total: int, done: int):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                 console=Console(stderr=True), transient=True)
    p.start()
    return p, p.add_task(label, total=total, completed=done)
