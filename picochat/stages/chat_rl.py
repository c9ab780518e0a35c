"""Reinforcement learning on a task's reward: `picochat chat-rl` (one process, or one per GPU under
torchrun). Starts from a chat checkpoint (sft by default; -i picks the stage) and saves to
$PICOCHAT_HOME/rl_checkpoints/<tag>/.

Each step: --examples-per-step prompts of the training task (split across ranks, rank r taking
examples r, r+W, ... in turn), --num-samples completions of each (sampled by the engine with the
python tool, in batches of --device-batch-size, each batch seeded by (step, example, batch)), a
reward per completion from the task, advantages = reward - the group's mean, and one optimizer
step on the policy-gradient loss (picochat/rl.py). The lrs are --init-lr-frac of the flags and fall
linearly to 0 over the run; Muon momentum stays 0.95 and weight decay --weight-decay.

--task gsm8k (GSM8K main: train for rollouts, test for pass@k; reward 1 for the right "#### N"),
spelling (SpellingBee), or module:Class for a task of your own: a picochat.tasks.common.Task built
as Class(split="train") and Class(split="test") whose reward(conversation, completion) returns a
float (Task.reward is 1.0 where evaluate() says correct). For pass@k a sample solves its problem
when its reward is positive.

Every --eval-every steps: pass@1 ... pass@--eval-samples on the first --eval-examples problems of
the test split (sampled as in training, with seeds of their own: the same samples at every
evaluation of the same weights).

Beyond the reference (which saves no optimizer state): checkpoints with the optimizer state every
--save-every steps and at the end, exact --resume (bit-identical rewards and losses), and a fresh run
never deletes a tag's checkpoints without --overwrite.

metrics.jsonl (in the checkpoint folder): training steps {"step", "reward" (mean over all samples of
all ranks), "seq_len" (mean generated tokens per sample, tool output included), "loss" (the
policy-gradient loss backpropagated, -objective; not a likelihood: it follows the advantages), "lrm", "dt",
"rollout_s" (the slowest rank's time sampling and rewarding, tool calls included),
"rollout_tok_per_s" (all ranks' generated tokens over that time), "samples"} and evaluations
{"step", "pass@1", ..., "pass@k", "eval_problems"}.
"""

import argparse
import dataclasses
import importlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from picochat import checkpoint as ckpt
from picochat.cli import HelpFormatter
from picochat.common import (
    PicochatError,
    compute_cleanup,
    compute_init,
    environment,
    out_of_memory_hint,
    print0,
    synchronize,
)
from picochat.engine import Engine
from picochat.rl import pass_at_k, policy_gradient_backward, rollout
from picochat.tasks.common import Task
from picochat.training import (
    LoopState,
    MetricsLog,
    check_resumable,
    check_resume_flags,
    find_resume_step,
    init_wandb,
    make_scaler,
    optimizer_step,
    restore_training_state,
    save_training_checkpoint,
    stop_requested,
    stop_signals,
)


@dataclass
class RLConfig:
    run: str = "dummy"  # wandb run name ("dummy" = no wandb)
    device_type: str = ""
    source: str = "sft"  # the checkpoint stage to start from
    model_tag: str | None = None  # its tag (None: the latest)
    model_step: int | None = None  # its step (None: the last)
    output_tag: str | None = None  # this run's tag under rl_checkpoints (None: the source's tag)
    task: str = "gsm8k"
    num_epochs: int = 1
    num_iterations: int = -1  # -1: num_epochs passes over the training split
    device_batch_size: int = 8
    examples_per_step: int = 16
    num_samples: int = 16
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 50
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    weight_decay: float = 0.0
    init_lr_frac: float = 0.05
    eval_every: int = 60
    eval_examples: int = 400
    eval_samples: int = 8
    save_every: int = 60
    resume: bool = False
    resume_from_step: int = -1
    overwrite: bool = False


# Settings a resume may change: they cannot change the training trajectory
FREE_FLAGS = {"run", "device_type", "resume", "resume_from_step", "overwrite", "eval_every", "eval_examples",
              "eval_samples", "save_every", "output_tag"}


def build_tasks(name: str) -> tuple[Task, Task]:
    """(train, test) tasks for --task."""
    if name == "gsm8k":
        from picochat.tasks.gsm8k import GSM8K

        return GSM8K(subset="main", split="train"), GSM8K(subset="main", split="test")
    if name == "spelling":
        from picochat.tasks.spelling import SpellingBee

        return SpellingBee(size=80_000, split="train"), SpellingBee(size=256, split="test")
    module_name, _, class_name = name.partition(":")
    if not class_name:
        raise PicochatError(f"--task {name!r}: use gsm8k, spelling, or module:Class for a task of your own")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise PicochatError(f"--task {name!r}: cannot import it ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise PicochatError(f"--task {name!r} is not a picochat.tasks.common.Task subclass")
    try:
        return cls(split="train"), cls(split="test")
    except TypeError as e:
        raise PicochatError(f"--task {name!r}: chat-rl builds it as {class_name}(split='train') and "
                            f"{class_name}(split='test'), which fails ({e})") from None


class ExampleCursor:
    """This rank's training examples rank, rank + W, ... in turn, over and over; how many were taken
    is all its state (saved in checkpoints, so a resumed run takes the same next examples)."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = range(rank, size, world_size)
        self.taken = 0

    def __next__(self) -> int:
        index = self.indices[self.taken % len(self.indices)]
        self.taken += 1
        return index

    def state_dict(self) -> dict:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict):
        self.taken = state["taken"]


def check_config(c: RLConfig, world_size: int):
    check_resume_flags(c.resume, c.resume_from_step, c.overwrite)
    if c.source not in ckpt.SOURCES:
        raise PicochatError(f"-i/--source must be one of {', '.join(ckpt.SOURCES)} (got {c.source!r})")
    for name in ("device_batch_size", "examples_per_step", "num_samples", "max_new_tokens", "num_epochs",
                 "eval_samples"):
        if getattr(c, name) < 1:
            raise PicochatError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(c, name)})")
    if c.eval_examples == 0 or c.eval_examples < -1:
        raise PicochatError(f"--eval-examples must be -1 (all) or at least 1 (got {c.eval_examples})")
    # each pass of a group weighs the same in the loss (the reference's normalisation): passes of
    # equal size keep every token's weight equal too
    if c.num_samples % c.device_batch_size:
        raise PicochatError(f"--num-samples {c.num_samples} must be a multiple of --device-batch-size "
                            f"{c.device_batch_size} (the loss weighs each batch of a prompt's samples alike)")
    if c.examples_per_step % world_size:
        raise PicochatError(f"--examples-per-step {c.examples_per_step} must be divisible by the number of "
                            f"processes ({world_size})")
    if not 0 <= c.temperature <= 2 or c.top_k < 0:
        raise PicochatError("--temperature must lie in [0, 2] and --top-k be at least 0 (0 = no top-k)")
    if c.init_lr_frac <= 0:
        raise PicochatError(f"--init-lr-frac must be positive (got {c.init_lr_frac})")


def lr_multiplier(step: int, num_steps: int) -> float:
    return 1.0 - step / num_steps


@dataclass
class Run:
    c: RLConfig
    rt: object
    model: torch.nn.Module
    engine: Engine
    optimizer: torch.optim.Optimizer
    scaler: object
    train_task: Task
    eval_task: Task
    cursor: ExampleCursor
    num_steps: int
    examples_per_rank: int
    ckpt_dir: object
    meta: dict


def setup(c: RLConfig, rt):
    """Build the run; returns (run, resume_step, loop)."""
    src_dir, src_step = ckpt.resolve_checkpoint(c.source, c.model_tag, c.model_step)
    train_task, eval_task = build_tasks(c.task)  # fetched before --overwrite could delete anything
    if len(train_task) < c.examples_per_step:
        raise PicochatError(f"--task {c.task}: its {len(train_task)} training examples are fewer than "
                            f"--examples-per-step {c.examples_per_step}")
    num_steps = c.num_iterations if c.num_iterations > 0 else (len(train_task) // c.examples_per_step) * c.num_epochs
    tag = c.output_tag or src_dir.name
    if c.source == "rl" and tag == src_dir.name:
        raise PicochatError(f"-i rl starts from the RL run {tag!r}, which this run would write into: give it its own "
                            "--output-tag")
    ckpt_dir = ckpt.checkpoint_dir("rl", tag)
    resume_step = find_resume_step(ckpt_dir, c.resume, c.resume_from_step, c.overwrite, rt.rank, rt.ddp)

    model, tokenizer, _ = ckpt.load_model(c.source, rt.device, rt.dtype, src_dir.name, src_step)
    if resume_step is not None:
        where = f"the checkpoint at step {resume_step} in {ckpt_dir}"
        saved_meta = ckpt.load_meta(ckpt_dir, resume_step)
        check_resumable(saved_meta, where, model.config, dataclasses.asdict(c), FREE_FLAGS, rt.world_size, rt.dtype,
                        tokenizer)
        if saved_meta["num_steps"] != num_steps:  # e.g. the task's data changed since: another run
            raise PicochatError(f"{where} was a run of {saved_meta['num_steps']} steps, this one has {num_steps} "
                                f"(the task {c.task!r} has {len(train_task):,} training examples now)")
        ckpt.load_state_into(model, ckpt.load_model_state(ckpt_dir, resume_step, rt.device))
        print0(f"resuming from {where}")
    # not compiled, as the reference: every step's sequences have other lengths
    optimizer = model.setup_optimizer(unembedding_lr=c.unembedding_lr, embedding_lr=c.embedding_lr,
                                      matrix_lr=c.matrix_lr, weight_decay=c.weight_decay)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"] = group["initial_lr"] * c.init_lr_frac
    cursor = ExampleCursor(len(train_task), rt.rank, rt.world_size)
    meta = {"model_config": dataclasses.asdict(model.config), "user_config": dataclasses.asdict(c),
            "tokenizer": tokenizer.fingerprint(), "world_size": rt.world_size, "compute_dtype": str(rt.dtype),
            "source_checkpoint": {"stage": c.source, "tag": src_dir.name, "step": src_step}, "num_steps": num_steps,
            "environment": environment(rt.device)}
    r = Run(c, rt, model, Engine(model, tokenizer), optimizer, make_scaler(rt.device, rt.dtype), train_task,
            eval_task, cursor, num_steps, c.examples_per_step // rt.world_size, ckpt_dir, meta)
    print0(f"RL from {c.source} {src_dir.name} step {src_step} -> {ckpt_dir} | task {c.task}: "
           f"{len(train_task):,} training examples, {num_steps} steps of {c.examples_per_step} examples x "
           f"{c.num_samples} samples | lrs x{c.init_lr_frac}: embedding {c.embedding_lr}, unembedding "
           f"{c.unembedding_lr}, matrix {c.matrix_lr}")
    if resume_step is None:
        return r, None, LoopState()
    rank_state = ckpt.load_optim_state(ckpt_dir, resume_step, rt.rank, rt.device)
    loop, _ = restore_training_state(rank_state, saved_meta, optimizer, cursor, r.scaler, rt.device)
    return r, resume_step, loop


def all_reduce(values: list[float], rt, op=dist.ReduceOp.SUM) -> list[float]:
    """Elementwise sums (or op) over the ranks (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    if rt.ddp:
        dist.all_reduce(t, op=op)
    return t.tolist()


def evaluate(r: Run) -> dict:
    c, rt = r.c, r.rt
    size = min(c.eval_examples, len(r.eval_task)) if c.eval_examples > 0 else len(r.eval_task)
    r.model.eval()
    with out_of_memory_hint("--device-batch-size", c.device_batch_size, "in pass@k evaluation"):
        solved = pass_at_k(r.engine, r.eval_task, range(rt.rank, size, rt.world_size), c.eval_samples,
                           c.device_batch_size, c.max_new_tokens, c.temperature, c.top_k or None)
    r.model.train()
    *solved, total = all_reduce([*solved.tolist(), len(range(rt.rank, size, rt.world_size))], rt)
    return {**{f"pass@{k + 1}": s / max(total, 1) for k, s in enumerate(solved)}, "eval_problems": int(total)}


def train_step(r: Run, step: int) -> dict:
    """Rollouts for this rank's examples, then one optimizer step on their loss."""
    c, rt = r.c, r.rt
    synchronize(rt.device)
    t0 = time.perf_counter()
    r.model.eval()
    with out_of_memory_hint("--device-batch-size", c.device_batch_size, "in rollouts"):
        groups = [rollout(r.engine, r.train_task, r.train_task[index], step, index, c.num_samples,
                          c.device_batch_size, c.max_new_tokens, c.temperature, c.top_k or None, rt.device)
                  for index in (next(r.cursor) for _ in range(r.examples_per_rank))]
    synchronize(rt.device)
    t1 = time.perf_counter()
    r.model.train()
    objective = 0.0
    # every group takes part, also one whose advantages are all 0: MuonAdamW wants every
    # parameter's gradient on every rank
    with out_of_memory_hint("--device-batch-size", c.device_batch_size, "in the policy-gradient step"):
        for group in groups:
            objective += policy_gradient_backward(r.model, group, c.device_batch_size, r.examples_per_rank, r.scaler)
    lrm = lr_multiplier(step, r.num_steps)
    for g in r.optimizer.param_groups:
        g["lr"] = g["initial_lr"] * lrm
    optimizer_step(r.optimizer, r.scaler, rt.ddp)
    synchronize(rt.device)
    t2 = time.perf_counter()
    rewards = sum(g.rewards.sum().item() for g in groups)
    tokens = sum(sum(g.lengths) for g in groups)
    samples = sum(len(g.lengths) for g in groups)
    rewards, tokens, samples, objective = all_reduce([rewards, tokens, samples, objective], rt)
    # the slowest rank's: every rank waits for it at the optimizer step
    (rollout_s,) = all_reduce([t1 - t0], rt, dist.ReduceOp.MAX)
    return {"reward": rewards / samples, "seq_len": tokens / samples, "loss": -objective / rt.world_size,
            "lrm": lrm, "dt": t2 - t0, "rollout_s": rollout_s, "rollout_tok_per_s": tokens / rollout_s,
            "samples": int(samples)}


def save(r: Run, step: int, loop: LoopState, evals_done: bool):
    loop = dataclasses.replace(loop, evals_done=evals_done)
    save_training_checkpoint(r.ckpt_dir, step, r.model, r.optimizer, r.cursor, (), r.scaler, loop, r.meta,
                             r.rt.rank, r.rt.device)


def run(c: RLConfig) -> dict:
    rt = compute_init(c.device_type)
    try:
        check_config(c, rt.world_size)
        with stop_signals() as stop:
            return train(c, rt, stop)
    finally:
        compute_cleanup()


def train(c: RLConfig, rt, stop) -> dict:
    print0(f"picochat chat-rl | {rt.world_size} process(es) | compute dtype: {rt.dtype} ({rt.dtype_reason})")
    r, resume_step, loop = setup(c, rt)
    wandb_run = init_wandb(c.run, dataclasses.asdict(c), rt.master)
    metrics = MetricsLog(r.ckpt_dir / "metrics.jsonl", rt.master, resume_step, loop.evals_done)
    step = first_step = resume_step or 0
    last_eval = {}
    try:
        while True:
            last = step == r.num_steps
            if stop_requested(stop, rt.device, rt.ddp):
                if step != first_step:
                    save(r, step, loop, evals_done=False)
                print0(f"stopped at step {step}; continue with --resume")
                raise KeyboardInterrupt(f"stopped at step {step}")
            evals_ran = resume_step is not None and loop.evals_done and step == first_step
            if not evals_ran and c.eval_every > 0 and (last or step % c.eval_every == 0):
                last_eval = evaluate(r)
                metrics.write({"step": step, **last_eval})
                print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in last_eval.items()
                                                          if k.startswith("pass@"))
                       + f" ({last_eval['eval_problems']} problems)")
                if wandb_run is not None:
                    wandb_run.log({f"eval/{k}": v for k, v in last_eval.items()}, step=step)
            if step != first_step and (last or (c.save_every > 0 and step % c.save_every == 0)):
                save(r, step, loop, evals_done=True)
            if last:
                break

            record = train_step(r, step)
            metrics.write({"step": step, **record})
            print0(f"step {step:05d}/{r.num_steps} | reward: {record['reward']:.4f} | seq len: "
                   f"{record['seq_len']:.1f} | lrm: {record['lrm']:.3f} | dt: {record['dt'] * 1000:.0f}ms | "
                   f"rollout tok/sec: {record['rollout_tok_per_s']:,.0f}")
            if wandb_run is not None:
                wandb_run.log({f"train/{k}": v for k, v in record.items()}, step=step)
            step += 1
    finally:
        metrics.close()
    print0(f"RL done: {step} steps | {r.ckpt_dir}")
    if wandb_run is not None:
        wandb_run.finish()
    return {"step": step, "eval": last_eval, "checkpoint_dir": str(r.ckpt_dir)}


def main(argv=None):
    d = RLConfig()
    p = argparse.ArgumentParser(prog="picochat chat-rl", formatter_class=HelpFormatter,
                                description="Reinforcement learning on a task's reward (GSM8K by default): "
                                "REINFORCE with a group-mean baseline, fully on-policy.")
    g = p.add_argument_group("logging and runtime")
    g.add_argument("--run", default=d.run, help="wandb run name ('dummy' = no wandb)")
    g.add_argument("--device-type", default=d.device_type, help="cuda, mps or cpu (if not given: autodetect)")
    g = p.add_argument_group("models")
    g.add_argument("-i", "--source", default=d.source, choices=list(ckpt.SOURCES),
                   help="checkpoint stage to start from")
    g.add_argument("--model-tag", default=d.model_tag, help="its tag (if not given: the latest)")
    g.add_argument("--model-step", type=int, default=d.model_step, help="its step (if not given: the last)")
    g.add_argument("--output-tag", default=d.output_tag, help="this run's tag (if not given: the source's tag)")
    g = p.add_argument_group("task and rollouts")
    g.add_argument("--task", default=d.task,
                   help="gsm8k, spelling, or module:Class (a Task with a reward; see the module docstring)")
    g.add_argument("--num-epochs", type=int, default=d.num_epochs, help="passes over the training split")
    g.add_argument("--num-iterations", type=int, default=d.num_iterations,
                   help="steps (-1 = --num-epochs passes over the training split)")
    g.add_argument("--examples-per-step", type=int, default=d.examples_per_step,
                   help="prompts per step, all processes together (divisible by their number)")
    g.add_argument("--num-samples", type=int, default=d.num_samples, help="completions per prompt (the group)")
    g.add_argument("--device-batch-size", type=int, default=d.device_batch_size,
                   help="sequences per generation batch and per forward/backward pass")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens per completion at most")
    g.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature")
    g.add_argument("--top-k", type=int, default=d.top_k, help="sample from the k likeliest tokens (0 = all)")
    g = p.add_argument_group("optimization")
    g.add_argument("--embedding-lr", type=float, default=d.embedding_lr, help="AdamW lr of the embeddings")
    g.add_argument("--unembedding-lr", type=float, default=d.unembedding_lr, help="AdamW lr of the output head")
    g.add_argument("--matrix-lr", type=float, default=d.matrix_lr, help="Muon lr of the matrices")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="Muon weight decay")
    g.add_argument("--init-lr-frac", type=float, default=d.init_lr_frac,
                   help="the lrs start at this fraction of the flags, then fall linearly to 0")
    g = p.add_argument_group("resume")
    g.add_argument("--resume", action="store_true", help="continue from this tag's latest RL checkpoint (if any)")
    g.add_argument("--resume-from-step", type=int, default=d.resume_from_step,
                   help="continue from this tag's RL checkpoint at this step (-1 = no)")
    g.add_argument("--overwrite", action="store_true", help="delete this tag's earlier RL checkpoints and start over")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between pass@k evals (-1 = never)")
    g.add_argument("--eval-examples", type=int, default=d.eval_examples,
                   help="test problems per eval (-1 = the whole test split)")
    g.add_argument("--eval-samples", type=int, default=d.eval_samples, help="k of pass@1..k: samples per problem")
    g.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints (-1 = at the end)")
    run(RLConfig(**vars(p.parse_args(argv))))


if __name__ == "__main__":
    from picochat import cli

    cli.run(main)
