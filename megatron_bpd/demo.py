"""The complete distillation on a CPU machine, in minutes: ``python -m megatron_bpd.demo --out DIR``.

1. Takes the shipped tiny Qwen3 teacher that solves column addition step by step and the student to distill
   (``megatron_bpd/data/task_models``; ``--prepare`` makes them anew with ``megatron_bpd.tasks``).
2. Trains the student with on-policy distillation (Teacher-TopK/LSM with a Block-16 drift gate by default,
   ``--loss sampled_token`` for sampled-token OPD) at TP=2 over gloo (``torchrun`` of ``megatron_bpd.train``), with the project's
   SGLang-protocol servers for rollouts and teacher scores.
3. The trainer evaluates the student on held-out problems before training, every ``--eval-every`` steps and at the
   end (greedy accuracy and pass@1 at T=1 through the rollout server, by difficulty), the teacher once, and the
   student-teacher KL on a fixed probe set.
4. Writes ``DIR/report.md`` (before/after with 95% intervals), ``DIR/summary.json``, ``DIR/metrics.jsonl`` (one
   object per step), ``DIR/evals.jsonl``, ``DIR/training.png``, ``DIR/eval_curve.png``, ``DIR/tensorboard/`` and
   ``DIR/config.yaml``.
"""

import argparse
import json
import time
from pathlib import Path

from .experiment import TaskRun, launch, task_prompts
from .tasks.registry import TASKS
from .train.config import EvalSettings


def _print_step(record: dict) -> None:
    line = (f"[demo] step {record['step']:3d}  loss {record.get('loss', float('nan')):+.4f}  "
            f"solve {record.get('solve_rate', float('nan')):.2f}  |drift| {record.get('drift_abs_mean', 0):.4f}  "
            f"gate {record.get('gate_min', 1):.3f}..{record.get('gate_max', 1):.3f}")
    if "eval_greedy" in record:
        line += f"  held-out greedy {record['eval_greedy']:.3f} pass@1 {record.get('eval_pass1', float('nan')):.3f}"
    print(line, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TaskRun("", "", "", "", "")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--task", choices=sorted(TASKS), default="addition",
                        help="the synthetic task (megatron_bpd.tasks.registry) and its shipped teacher and student")
    parser.add_argument("--loss", choices=("sampled_token", "topk_lsm"), default="topk_lsm",
                        help="topk_lsm (Teacher-TopK/LSM, the default: it lifts the student on this task); "
                             "sampled_token does not here (docs/results/opd_regime.md)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=16,
                        help="Block gate size in tokens (responses are ~12 tokens per line); 0: no gate")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-problems", type=int, default=defaults.eval_limit)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--eval-samples", type=int, default=defaults.eval_samples)
    parser.add_argument("--prepare", action="store_true",
                        help="SFT a new teacher and student (cached in ~/.cache/megatron-bpd/task-models) instead of "
                             "using the shipped ones")
    args = parser.parse_args(argv)

    from .tasks.sft import PrepConfig, prepare_teacher_and_student
    from .train.metrics import plot_evals, plot_metrics

    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    task = TASKS[args.task]
    prep = PrepConfig(seed=args.seed)
    if args.prepare:
        if args.task != "addition":
            parser.error(f"--prepare makes the addition task's pair; the {args.task} pair's recipe is in "
                         f"{task.models / 'README.md'}")
        summary = prepare_teacher_and_student(Path.home() / ".cache" / "megatron-bpd" / "task-models", args.seed,
                                              config=prep)
        models = {role: summary[role]["path"] for role in ("teacher", "student")}
    else:
        models = {role: str(task.models / role) for role in ("teacher", "student")}
    gate = {"granularity": "block", "block_size": args.block_size} if args.block_size else {"granularity": "none"}
    run = TaskRun(str(out), models["student"], models["teacher"],
                  *task_prompts(out, args.eval_problems, args.seed, args.task), task=args.task,
                  max_new_tokens=max(defaults.max_new_tokens, task.max_new_tokens()), loss=args.loss, gate=gate,
                  steps=args.steps, seed=args.seed, lr=args.lr, tp=args.tp,
                  eval_every=args.eval_every, eval_limit=args.eval_problems, eval_samples=args.eval_samples)
    print(f"[demo] {run.loss} OPD of {models['student']} from {models['teacher']}, {run.steps} steps at TP={run.tp} "
          f"(log: {out / 'train.log'})", flush=True)
    result = launch(run, follow=_print_step)
    title = f"{args.loss} OPD, TP={args.tp} (CPU demo)"
    plot_metrics(result["metrics"], out / "training.png", title)
    plot_evals(result["evals"], out / "eval_curve.png", title)
    seconds = time.perf_counter() - started
    before, after = result["evals"][0], result["evals"][-1]
    summary = {"accuracy": {"student_before": before["student"]["greedy"], "student_after": after["student"]["greedy"],
                            "teacher": before["teacher"]["greedy"]},
               "pass1": {"student_before": before["student"].get("pass1"),
                         "student_after": after["student"].get("pass1"), "teacher": before["teacher"].get("pass1")},
               "support_kl": {"before": before.get("support_kl"), "after": after.get("support_kl")},
               "steps": run.steps, "seconds": round(seconds, 1), "eval_problems": before["student"]["n"],
               "loss": run.loss, "models": models}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    report = _report(run, result, seconds)
    (out / "report.md").write_text(report)
    print(report)
    return summary


def _row(name: str, ev: dict) -> str:
    greedy, pass1 = ev["greedy"], ev.get("pass1", float("nan"))
    gl, gh = ev["greedy_ci"]
    pl, ph = ev.get("pass1_ci", (float("nan"), float("nan")))
    return f"| {name} | {greedy:.3f} [{gl:.3f}, {gh:.3f}] | {pass1:.3f} [{pl:.3f}, {ph:.3f}] |"


def _report(run: TaskRun, result: dict, seconds: float) -> str:
    records, evals = result["metrics"], result["evals"]
    first, last = records[0], records[-1]
    before, after = evals[0], evals[-1]
    rows = "\n".join([_row("student before", before["student"]), _row(f"student after {after['step']} steps",
                                                                      after["student"]), _row("teacher", before["teacher"])])
    difficulties = sorted(before["student"].get("by_difficulty", {}), key=lambda d: (len(d), d))
    by_difficulty = "\n".join(
        f"| {d} | {before['student']['by_difficulty'][d]['n']} | {before['student']['by_difficulty'][d]['greedy']:.3f} | "
        f"{after['student']['by_difficulty'][d]['greedy']:.3f} | {before['teacher']['by_difficulty'][d]['greedy']:.3f} |"
        for d in difficulties)
    curve = "\n".join(f"| {e['step']} | {e['student']['greedy']:.3f} | {e['student'].get('pass1', float('nan')):.3f} | "
                      f"{e.get('support_kl', float('nan')):.4f} |" for e in evals)
    gate = run.gate if run.loss != "sft" else {"granularity": "none"}
    return f"""# megatron-bpd CPU demo

{run.loss} on-policy distillation (gate: {gate}), {run.steps} steps at TP={run.tp} (gloo),
{run.prompts_per_step} prompts x {run.samples_per_prompt} samples per step, {run.epochs} epoch(s) x
{run.minibatches} mini-batches (optimizer updates per rollout batch), Adam lr {run.lr:g}. Total time
{seconds / 60:.1f} min (training {result['seconds'] / 60:.1f} min, evaluations included).

## Held-out accuracy ({before['student']['n']} problems, 95% intervals)

Greedy: exact match of the greedy response (Wilson interval). pass@1: mean over problems of the fraction of
{run.eval_samples} samples at T=1, top-p 0.9 that are correct (normal interval over problems).

| model | greedy | pass@1 |
|---|---|---|
{rows}

| difficulty ({TASKS[run.task].difficulty_name}) | problems | student before | student after | teacher |
|---|---|---|---|---|
{by_difficulty}

## Evaluation curve

| step | greedy | pass@1 | student-teacher KL on the top-K (probe) |
|---|---|---|---|
{curve}

The probe is the student's reverse KL to the teacher on the teacher's top-K, per token, over
{EvalSettings.probe_prompts} x {EvalSettings.probe_samples} responses the
*current* student samples at each evaluation: an on-policy measure of a few thousand tokens, most of them format
tokens both models agree on, whose sampled states change as the student does. It is noisy from one evaluation to the
next and does not follow the held-out accuracy step by step; the held-out accuracy is the measure of learning here.

![held-out evaluation](eval_curve.png)

## Training

| | step {first['step']} | step {last['step']} |
|---|---|---|
| loss | {first.get('loss', float('nan')):.4f} | {last.get('loss', float('nan')):.4f} |
| training solve rate (this step's prompts) | {first.get('solve_rate', float('nan')):.3f} | {last.get('solve_rate', float('nan')):.3f} |
| teacher-student KL on the top-K support (training rollouts) | {first.get('support_kl', float('nan')):.4f} | {last.get('support_kl', float('nan')):.4f} |
| mean token drift from the behavior policy | {first.get('drift_abs_mean', float('nan')):.4f} | {last.get('drift_abs_mean', float('nan')):.4f} |
| gate min / max | {first.get('gate_min', 1):.3f} / {first.get('gate_max', 1):.3f} | {last.get('gate_min', 1):.3f} / {last.get('gate_max', 1):.3f} |
| rollout/train log-prob mismatch | {first.get('rollout_train_mismatch', float('nan')):.2e} | {last.get('rollout_train_mismatch', float('nan')):.2e} |

![training](training.png)

Files: `summary.json`, `metrics.jsonl` (one object per step), `evals.jsonl`, `tensorboard/`, `config.yaml` (rerun
with `torchrun --standalone --nproc-per-node {run.tp} -m megatron_bpd.train --config config.yaml`), `train.log`.
"""


if __name__ == "__main__":
    main()
