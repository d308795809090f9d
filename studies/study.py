"""The skeleton every study shares: plan the runs, train the missing ones, summarize, write the report and figures.

A study (``Study``) names its runs (``plan``: identities and seeds, each kept as ``<run_name>/seed<k>``), says how
each one trains (``configure``: a ``TaskRun`` from the shared base), and turns the finished runs into
``results.json`` (``summarize``), figures (``plot``) and ``report.md`` (``report``). ``main`` does the rest:

- the command line every study takes (``--out``, ``--seeds``, ``--steps``, the held-out evaluation, ``--quick``,
  ``--report-only``, ``--worker K/N``, ``--only TEXT``, ``--work``) plus the study's own (``arguments``);
- every run goes through ``experiment.launch`` in a scratch folder (``--work``, by default a temporary one) and is
  then packed into ``OUT/runs.tar.xz`` (``archive.RunArchive``), the one file its report is regenerated from, with
  the machine it trained on (``args.machine``, which the report states);
- ``--quick`` (a smoke test: 2 steps, 1 seed, 8 held-out problems) never writes into docs/.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from megatron_bpd.experiment import TaskRun, launch, task_prompts
from megatron_bpd.tasks.registry import TASKS

from .archive import MACHINE, RunArchive

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = "runs.tar.xz"


class Study:
    """One study. Subclasses set ``name`` (``python -m studies.<name>``), the evaluation defaults, and implement the
    methods below; ``main`` runs it."""

    name = ""
    task = "addition"  # the task (``tasks.registry``) whose shipped pair every run starts from
    eval_every = TaskRun.eval_every
    eval_samples = TaskRun.eval_samples

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the study's own options."""

    def plan(self, args) -> list:
        """The runs, in report order: ``[(identity, seed)]``."""
        raise NotImplementedError

    def prompt_files(self, identity, data_dir: Path, args) -> tuple:
        """(training prompts, held-out prompts) of ``identity``'s runs, written under ``data_dir`` (default: the
        task's, the same for every run)."""
        return task_prompts(data_dir, args.eval_problems, task=self.task)

    def run_name(self, identity) -> str:
        """The folder name of ``identity``'s runs."""
        raise NotImplementedError

    def configure(self, identity, base: TaskRun, args) -> TaskRun:
        """The run of ``identity`` from ``base`` (the shipped pair, the prompts, steps, seed and evaluation)."""
        raise NotImplementedError

    def summarize(self, runs: dict, missing: list, args) -> dict:
        """``results.json`` of the finished runs (``{(identity, seed): RunArchive.read(...)}``)."""
        raise NotImplementedError

    def plot(self, summary: dict, runs: dict, args) -> None:
        """Write the figures into ``args.out``."""

    def report(self, summary: dict, runs: dict, args) -> str:
        """The text of ``report.md``."""
        raise NotImplementedError

    def main(self, argv=None) -> dict:
        """``main(self, argv)``: the study's command line."""
        return main(self, argv)

    def log(self, msg: str) -> None:
        print(f"[{self.name.replace('_', '-')} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parser_for(study: Study) -> argparse.ArgumentParser:
    """The command line of ``study``: the shared options and its own."""
    parser = argparse.ArgumentParser(prog=f"python -m studies.{study.name}",
                                     description=sys.modules[type(study).__module__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help=f"the study's folder: {ARCHIVE}, report, figures")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=TaskRun.steps)
    parser.add_argument("--eval-every", type=int, default=study.eval_every)
    parser.add_argument("--eval-problems", type=int, default=TaskRun.eval_limit)
    parser.add_argument("--eval-samples", type=int, default=study.eval_samples)
    parser.add_argument("--quick", action="store_true", help="2 steps, 1 seed, 8 problems: a smoke test")
    parser.add_argument("--report-only", action="store_true", help="report the archived runs, train nothing")
    parser.add_argument("--worker", default="0/1", help="K/N: train only every N-th missing run, from the K-th")
    parser.add_argument("--only", nargs="+", metavar="TEXT",
                        help="train only the runs whose name contains one of these (e.g. e2m4-lr0.001); the report "
                             "still covers every archived run")
    parser.add_argument("--work", type=Path, help="where runs train before they are archived (default: a temporary "
                        "folder, removed at the end)")
    study.arguments(parser)
    return parser


def main(study: Study, argv=None) -> dict:
    """Parse the command line, train the missing runs into the archive, and write ``results.json``, the figures and
    ``report.md`` into ``--out``; returns the summary."""
    parser = parser_for(study)
    args = parser.parse_args(argv)
    if args.quick:
        if (ROOT / "docs") in args.out.resolve().parents or args.out.resolve() == ROOT / "docs":
            parser.error("--quick never writes into docs/: give a scratch --out")
        args.steps, args.seeds, args.eval_every, args.eval_problems, args.eval_samples = 2, [0], 1, 8, 2
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.command = f"python -m studies.{study.name} " + " ".join(argv if argv is not None else sys.argv[1:])
    archive = RunArchive(args.out / ARCHIVE)
    runs, missing = run_all(study, archive, args)
    args.machine = archive.machine() or this_machine()
    summary = study.summarize(runs, missing, args) if runs else archive.summary()
    if summary is None:
        parser.error("no finished run to report")
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    study.plot(summary, runs, args)
    (args.out / "report.md").write_text(study.report(summary, runs, args))
    study.log(f"wrote {args.out / 'report.md'}")
    return summary


def run_all(study: Study, archive: RunArchive, args) -> tuple:
    """({(identity, seed): archived run} in plan order, [keys of the runs still missing]). Trains the missing runs
    unless ``--report-only``; with ``--worker K/N`` only every N-th run (of those ``--only`` selects), from the
    K-th, so that N processes can share one study."""
    worker, workers = map(int, args.worker.split("/"))
    planned = [(identity, seed, f"{study.run_name(identity)}/seed{seed}") for identity, seed in study.plan(args)]
    selected = [item for item in planned if not args.only or any(text in item[2] for text in args.only)]
    held = archive.keys()
    mine = [] if args.report_only else [item for item in selected[worker::workers] if item[2] not in held]
    if mine:
        work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix=f"{study.name}-"))
        task = TASKS[study.task]
        base = TaskRun(out="", student=str(task.models / "student"), teacher=str(task.models / "teacher"),
                       prompts="", eval_prompts="", task=study.task, steps=args.steps, eval_every=args.eval_every,
                       eval_limit=args.eval_problems, eval_samples=args.eval_samples,
                       max_new_tokens=max(TaskRun.max_new_tokens, task.max_new_tokens()))
        if archive.machine() is None:
            archive.put({MACHINE: json.dumps(this_machine())})
        for i, (identity, seed, key) in enumerate(mine):
            study.log(f"[{i + 1}/{len(mine)}] {key}")
            run_dir = work / "runs" / key
            prompts, eval_prompts = study.prompt_files(identity, work / "data", args)
            run = base.replace(seed=seed, prompts=prompts, eval_prompts=eval_prompts)
            result = launch(study.configure(identity, run, args).replace(out=str(run_dir)))
            first, last = result["evals"][0]["student"], result["evals"][-1]["student"]
            study.log(f"    greedy {first['greedy']:.3f} -> {last['greedy']:.3f}, pass@1 {first['pass1']:.3f} -> "
                      f"{last['pass1']:.3f} in {result['seconds']:.0f} s")
            archive.add({key: run_dir})
            shutil.rmtree(run_dir)
        if not args.work:
            shutil.rmtree(work)
    held = archive.keys()
    runs = {(identity, seed): archive.read(key) for identity, seed, key in planned if key in held}
    return runs, [key for _, _, key in planned if key not in held]


def this_machine() -> dict:
    """The ``archive.MACHINE`` record of this machine."""
    return {"machine": platform.machine(), "python": platform.python_version()}
