"""Supervised fine-tuning of tiny HF Qwen3 models on the addition task, greedy accuracy, and the cached
teacher/student pair of the CPU demo and the toy reproduction.

Plain PyTorch + transformers on CPU: the prompt goes through the chat template (``add_generation_prompt``), the
solution and ``<|im_end|>`` follow, and the loss covers only the solution tokens and that end token.

Default pair (``PrepConfig()``, digits 2..4, seed 0), measured on a shared 2-core CPU machine, 1 torch thread:
teacher 4 layers / hidden 128, 800 steps x 16 with noisy inputs (``noise`` 0.1: it learns to continue correctly
after an error in its context) -> greedy accuracy 0.99 (2/3/4 digits: 1.00/1.00/0.975); student of the same shape
after 300 clean steps -> 0.515 (0.53/0.64/0.36): the regime where on-policy distillation lifts the student
(docs/results/opd_regime.md). The student's accuracy is steep in the step count (200 steps: 0.09), so another seed
may need ``--student-steps`` tuned. A few CPU-minutes in all. Use 1 torch thread when the cores are shared: 2
threads under contention ran about 15x slower.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

from megatron_bpd.tasks.arithmetic import Problem, make_dataset
from megatron_bpd.tasks.common import check
from megatron_bpd.tasks.registry import get_task

CACHE_VERSION = 1


def _prompt_ids(tokenizer, prompt_text: str) -> List[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt_text}], add_generation_prompt=True,
                                        tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return list(ids)


def encode_example(tokenizer, problem: Problem) -> Tuple[List[int], List[int]]:
    """(input ids, labels): chat-templated prompt (labels -100), then solution + ``<|im_end|>`` (labels = ids)."""
    prompt = _prompt_ids(tokenizer, problem.prompt_text)
    response = list(tokenizer(problem.solution_text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return prompt + response, [-100] * len(prompt) + response


def corrupt_digits(ids: List[int], labels: List[int], digit_ids: Sequence[int], rate: float,
                   rng: random.Random) -> List[int]:
    """Noisy inputs for clean targets: each solution digit (a position with a label) is replaced by another digit
    with probability ``rate``; the labels stay the gold tokens, so the model learns to continue *correctly* after
    an error in its context (a teacher that repairs a student's mistakes instead of carrying them forward)."""
    digits = set(digit_ids)
    out = list(ids)
    for j, (token, label) in enumerate(zip(ids, labels)):
        if label != -100 and token in digits and rng.random() < rate:
            out[j] = rng.choice([d for d in digit_ids if d != token])
    return out


def _collate(examples: Sequence[Tuple[List[int], List[int]]], pad_id: int):
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
        mask[i, :len(x)] = 1
    return ids, labels, mask


def sft_loss(model, ids, labels, mask) -> torch.Tensor:
    """Mean next-token cross entropy over the labelled (solution) positions."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


def train_sft(model_dir: Union[str, Path], problems: Sequence[Problem], steps: int, lr: float, batch_size: int,
              seed: int, out_dir: Union[str, Path], *, warmup: int = 20, weight_decay: float = 0.01,
              min_lr_ratio: float = 0.1, grad_clip: float = 1.0, noise: float = 0.0, threads: Optional[int] = None,
              progress: bool = True, log: Optional[list] = None) -> Path:
    """Fine-tune the HF model in ``model_dir`` on ``problems`` (AdamW, linear warmup then cosine decay to
    ``min_lr_ratio * lr``, batches drawn with ``random.Random(seed)``) and save model + tokenizer to ``out_dir``.
    ``noise`` > 0: half of the drawn examples get their solution digits corrupted at that rate in the inputs
    (``corrupt_digits``; the targets stay gold). ``log`` (a list), when given, receives the loss of every step."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    encoded: dict = {}  # problems are encoded when first drawn (a long list costs nothing up front)

    def example(i):
        if i not in encoded:
            encoded[i] = encode_example(tokenizer, problems[i])
        return encoded[i]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-8)

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    rng = random.Random(seed)
    digit_ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]

    def drawn(i):
        ids, labels = example(i)
        if noise > 0 and rng.random() < 0.5:
            ids = corrupt_digits(ids, labels, digit_ids, noise, rng)
        return ids, labels
    order: List[int] = []
    bar = tqdm(range(steps), desc=f"sft {Path(out_dir).name}", disable=not progress, leave=False)
    ema = None
    for step in bar:
        if len(order) < batch_size:
            order += rng.sample(range(len(problems)), len(problems))
        batch, order = order[:batch_size], order[batch_size:]
        ids, labels, mask = _collate([drawn(i) for i in batch], tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = sft_loss(model, ids, labels, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        value = loss.item()
        if log is not None:
            log.append(value)
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        bar.set_postfix(loss=f"{ema:.4f}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@torch.no_grad()
def generate(model_dir_or_model, problems: Sequence[Problem], max_new_tokens: Optional[int] = None,
             batch_size: int = 64, tokenizer=None, progress: bool = False) -> List[str]:
    """Greedy responses (decoded, special tokens dropped) with left-padded batches, in the order of ``problems``
    (any task's problems: ``prompt_text``, ``difficulty``, ``max_new_tokens``)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model_dir_or_model, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(model_dir_or_model)
        model = AutoModelForCausalLM.from_pretrained(model_dir_or_model, dtype=torch.float32)
    else:
        model = model_dir_or_model
        assert tokenizer is not None, "pass the tokenizer with a model object"
    model.eval()
    order = sorted(range(len(problems)), key=lambda i: problems[i].difficulty)  # similar lengths share a batch
    out: List[Optional[str]] = [None] * len(problems)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        prompts = [_prompt_ids(tokenizer, problems[i].prompt_text) for i in idx]
        width = max(map(len, prompts))
        ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        budget = max_new_tokens or max(problems[i].max_new_tokens for i in idx)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=budget, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True)
    return out  # type: ignore[return-value]


def accuracy(model_dir: Union[str, Path], problems: Sequence[Problem], max_new_tokens: Optional[int] = None,
             batch_size: int = 64, by_difficulty: Optional[dict] = None) -> float:
    """Fraction of ``problems`` solved exactly (``check``) by greedy decoding. ``by_difficulty`` (a dict), when
    given, receives the accuracy per difficulty (digit count, item count)."""
    responses = generate(model_dir, problems, max_new_tokens, batch_size)
    ok = [check(r, p.answer) for r, p in zip(responses, problems)]
    if by_difficulty is not None:
        for d in sorted({p.difficulty for p in problems}):
            sel = [o for o, p in zip(ok, problems) if p.difficulty == d]
            by_difficulty[d] = sum(sel) / len(sel)
    return sum(ok) / max(1, len(ok))


@dataclass
class ModelSpec:
    """Sizes of a tiny task model and its SFT schedule."""
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    ffn: int = 384
    tied: bool = True
    steps: int = 500
    lr: float = 3e-3
    batch_size: int = 16
    warmup: int = 20
    noise: float = 0.0  # digit corruption rate of the inputs (``train_sft``'s noise): a teacher that repairs errors


@dataclass
class PrepConfig:
    """Everything that determines the prepared pair of ``task`` (``tasks.registry``), fine-tuned on problems of
    ``difficulties`` (digits, items)."""
    seed: int = 0
    difficulties: Tuple[int, int] = (2, 4)
    task: str = "addition"
    n_train: int = 20000
    n_test: int = 200
    teacher: ModelSpec = field(default_factory=lambda: ModelSpec(steps=800, noise=0.1))  # repairs errors
    student: ModelSpec = field(default_factory=lambda: ModelSpec(steps=300))  # the teacher's shape, less trained


def recipe(task: str = "addition", seed: int = 0) -> PrepConfig:
    """The recipe of ``task``'s shipped pair (``data/task_models``; ``python -m megatron_bpd.tasks --task``)."""
    if task == "addition":
        return PrepConfig(seed=seed)
    if task == "running_sum":
        return PrepConfig(seed=seed, task=task, difficulties=(2, 24), n_train=20000, n_test=200,
                          teacher=ModelSpec(steps=2500, noise=0.1),
                          # 0.51 greedy at 22 items (the study's long horizon), 0.13 at 24; 1000 steps gave 0.00 at
                          # 23-24 items, 1400 steps 1.00 at 24 (about 9 problems each)
                          student=ModelSpec(steps=1200))
    raise ValueError(f"no recipe for task {task!r}")


def datasets(cfg: PrepConfig) -> Tuple[list, list]:
    """(train, test) problems of the preparation; the test set shares no problem with the train set. The addition
    task keeps the split its shipped pair was made with; the other tasks take the ``sft`` and ``dev`` splits of
    ``tasks.registry.study_splits`` (their first ``n_train`` / ``n_test``), restricted to ``difficulties``."""
    if cfg.task == "addition":
        train = make_dataset(cfg.n_train, cfg.seed * 2 + 1, tuple(cfg.difficulties))
        return train, make_dataset(cfg.n_test, cfg.seed * 2 + 2, tuple(cfg.difficulties), exclude=train)
    from megatron_bpd.tasks.registry import STUDY_SPLIT_SIZES, get_task, study_splits

    if cfg.n_train > STUDY_SPLIT_SIZES["sft"] or cfg.n_test > STUDY_SPLIT_SIZES["dev"]:
        raise ValueError(f"n_train <= {STUDY_SPLIT_SIZES['sft']} and n_test <= {STUDY_SPLIT_SIZES['dev']} (the study "
                         f"splits' sizes), got {cfg.n_train} and {cfg.n_test}")
    lo, hi = cfg.difficulties
    split = study_splits(get_task(cfg.task), cfg.seed)
    pick = lambda problems, n: [p for p in problems if lo <= p.difficulty <= hi][:n]  # noqa: E731
    return pick(split["sft"], cfg.n_train), pick(split["dev"], cfg.n_test)


def _build(spec: ModelSpec, task: str, init_dir: Path, out: Path, train: Sequence[Problem], seed: int, threads,
           progress) -> float:
    from megatron_bpd.tasks.models import make_task_model

    t0 = time.perf_counter()
    make_task_model(init_dir, layers=spec.layers, hidden=spec.hidden, heads=spec.heads, kv_heads=spec.kv_heads,
                    head_dim=spec.head_dim, ffn=spec.ffn, tied=spec.tied, seed=seed, task=task)
    train_sft(init_dir, train, spec.steps, spec.lr, spec.batch_size, seed, out, warmup=spec.warmup, noise=spec.noise,
              threads=threads, progress=progress)
    shutil.rmtree(init_dir, ignore_errors=True)
    return time.perf_counter() - t0


def _model_key(cfg: PrepConfig, role: str, spec: ModelSpec) -> str:
    # the addition pair's keys predate tasks and their formats
    task = {} if cfg.task == "addition" else {"task": cfg.task, "format": get_task(cfg.task).version}
    blob = json.dumps({"version": CACHE_VERSION, "role": role, "seed": cfg.seed, "digits": list(cfg.difficulties),
                       **task, "n_train": cfg.n_train, "n_test": cfg.n_test, "spec": asdict(spec)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepare_teacher_and_student(out_dir: Union[str, Path], seed: int = 0, *, config: Optional[PrepConfig] = None,
                                threads: Optional[int] = 1, progress: bool = True, verbose: bool = True) -> dict:
    """Make (or reuse) a SFT-trained teacher and a weaker student for the addition task and return the summary:
    paths, greedy accuracies on the held-out test set (overall and per digit count), seconds spent, the config.

    Each model is cached on its own under ``out_dir/<role>-<hash of seed, data and its spec>/`` (the HF folder
    plus ``meta.json`` with its accuracy), so a later call with the same parameters reuses it (``cached`` is
    True in its entry) and changing only the student's spec does not retrain the teacher."""
    cfg = config or PrepConfig(seed=seed)
    if cfg.seed != seed:
        cfg = replace(cfg, seed=seed)
    if threads is not None:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    train, test = datasets(cfg)
    summary = {"cache_dir": str(out_dir), "config": asdict(cfg), "torch_threads": torch.get_num_threads()}
    for role, spec, model_seed in (("teacher", cfg.teacher, cfg.seed), ("student", cfg.student, cfg.seed + 1000)):
        folder = out_dir / f"{role}-{_model_key(cfg, role, spec)}"
        meta_path = folder / "meta.json"
        if meta_path.exists():
            entry = json.loads(meta_path.read_text())
            entry["cached"] = True
        else:
            shutil.rmtree(folder, ignore_errors=True)  # a folder without meta.json is an interrupted run
            train_s = _build(spec, cfg.task, out_dir / f"{role}-{folder.name}-init", folder, train, model_seed, threads,
                             progress)
            t0 = time.perf_counter()
            per_digits: dict = {}
            acc = accuracy(folder, test, by_difficulty=per_digits)
            entry = {"path": str(folder), "accuracy": acc, "accuracy_by_difficulty": {str(k): v for k, v in
                                                                                  per_digits.items()},
                     "n_test": len(test), "spec": asdict(spec), "train_seconds": round(train_s, 1),
                     "eval_seconds": round(time.perf_counter() - t0, 1)}
            meta_path.write_text(json.dumps(entry, indent=1, sort_keys=True))
            entry["cached"] = False
        summary[role] = entry
        if verbose:
            how = "reused" if entry["cached"] else f"train {entry['train_seconds']:.0f}s, eval {entry['eval_seconds']:.0f}s"
            by = ", ".join(f"{k}: {v:.2f}" for k, v in entry["accuracy_by_difficulty"].items())
            print(f"[tasks] {role}: greedy accuracy {entry['accuracy']:.3f} on {entry['n_test']} held-out problems "
                  f"(by {get_task(cfg.task).difficulty_name} {by}); {how} -> {folder}")
    summary["cached"] = summary["teacher"]["cached"] and summary["student"]["cached"]
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    if verbose:
        print(f"[tasks] prepared in {summary['total_seconds']:.0f}s")
    return summary
