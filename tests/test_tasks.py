"""The addition task: exact checker, difficulty vs length, determinism, task tokenizer, a micro SFT run."""

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_bpd.tasks.arithmetic import make_dataset, make_problem, read_problems_jsonl, solution_lines
from megatron_bpd.tasks.common import check, extract_answer, write_prompts_jsonl

torch.set_num_threads(1)


def test_solution_is_correct_column_addition():
    lines = solution_lines(4821, 3977)
    assert lines == ["1+7+0=8 write 8 carry 0", "2+7+0=9 write 9 carry 0", "8+9+0=17 write 7 carry 1",
                     "4+3+1=8 write 8 carry 0", "answer: 8798", "\\boxed{8798}"]
    assert solution_lines(95, 7)[-2:] == ["answer: 102", "\\boxed{102}"]


@pytest.mark.parametrize("digits", [1, 2, 5, 8])
def test_checker_accepts_generated_solutions(digits):
    rng = random.Random(digits)
    for _ in range(50):
        p = make_problem(rng, digits)
        assert p.answer == str(p.a + p.b) and len(str(p.a)) == len(str(p.b)) == digits
        assert check(p.solution_text, p.answer)
        assert check(p.solution_text + "<|im_end|>", int(p.answer))
        assert check(p.solution_text.rsplit("\n", 1)[0], p.answer)  # without the \boxed line
        assert extract_answer(p.solution_text) == p.answer


def test_checker_rejects_corrupted_solutions():
    p = make_problem(random.Random(0), 5)
    wrong = str(int(p.answer) + 1)
    body, answer_line, boxed = p.solution_text.rsplit("\n", 2)
    bad = [
        p.solution_text.replace(f"answer: {p.answer}", f"answer: {wrong}"),          # wrong answer digit
        body,                                                                         # missing answer line
        body + "\n" + boxed,                                                          # boxed but no answer line
        p.solution_text + "\nand some more text",                                     # extra text after
        p.solution_text + " extra",                                                   # extra text on the line
        body + "\n" + answer_line + "\n\\boxed{" + wrong + "}",                       # boxed disagrees
        f"answer: {p.answer}\n" + body,                                               # answer not last
        "",
    ]
    for text in bad:
        assert not check(text, p.answer), text
    assert not check(p.solution_text, wrong)


def test_difficulty_grows_response_length():
    from megatron_bpd.tasks.models import task_tokenizer

    tok = task_tokenizer()
    mean_tokens, mean_lines = [], []
    for digits in range(2, 9):
        ps = make_dataset(20, 0, digits)
        assert all(p.digits == digits for p in ps)
        mean_lines.append(sum(p.solution_text.count("\n") + 1 for p in ps) / len(ps))
        mean_tokens.append(sum(len(tok(p.solution_text)["input_ids"]) for p in ps) / len(ps))
    assert mean_lines == [d + 2 for d in range(2, 9)]
    assert all(b > a + 10 for a, b in zip(mean_tokens, mean_tokens[1:])), mean_tokens


def test_dataset_determinism_and_held_out(tmp_path):
    a, b = make_dataset(100, 7, (2, 6)), make_dataset(100, 7, (2, 6))
    assert a == b and make_dataset(100, 8, (2, 6)) != a
    assert {p.digits for p in a} == {2, 3, 4, 5, 6}
    held = make_dataset(50, 9, (2, 3), exclude=a)
    assert not {(p.a, p.b) for p in held} & {(p.a, p.b) for p in a}
    path = write_prompts_jsonl(tmp_path / "x.jsonl", a[:5])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [set(r) for r in rows] == [{"prompt", "answer", "digits", "difficulty"}] * 5
    assert rows[0] == {"prompt": a[0].prompt_text, "answer": a[0].answer, "digits": a[0].digits,
                       "difficulty": a[0].digits}
    assert read_problems_jsonl(path) == a[:5]


def test_task_tokenizer_round_trips_and_has_task_tokens():
    from megatron_bpd.tasks.models import task_tokenizer

    tok = task_tokenizer()
    vocab = tok.get_vocab()
    for piece in ("Ġwrite", "Ġcarry", "answer", ":", "Ċ", "+", "=", *"0123456789"):
        assert piece in vocab, piece
    assert [tok.convert_ids_to_tokens(i) for i in range(3)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    texts = [p.prompt_text + "\n" + p.solution_text for p in make_dataset(30, 3, (1, 9))]
    texts += ["Héllo wörld ✓ 12,345.6\t\n  x", "\\boxed{00123}"]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    ids = tok("123456 write", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["1", "2", "3", "4", "5", "6", "Ġwrite"]  # one token per digit


def test_micro_sft_decreases_loss_and_writes_loadable_folder(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_bpd.tasks.models import make_task_model
    from megatron_bpd.tasks.sft import accuracy, encode_example, train_sft

    init = make_task_model(tmp_path / "init", layers=1, hidden=32, heads=2, kv_heads=1, head_dim=16, ffn=64, seed=0)
    problems = make_dataset(64, 0, (2, 3))
    log = []
    out = train_sft(init, problems, steps=12, lr=1e-2, batch_size=8, seed=0, out_dir=tmp_path / "sft", warmup=2,
                    progress=False, log=log)
    assert sum(log[-3:]) / 3 < 0.8 * sum(log[:3]) / 3, log
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and tok.chat_template and tok.eos_token == "<|im_end|>"
    ids, labels = encode_example(tok, problems[0])
    n_prompt = labels.count(-100)
    assert tok.decode(ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    assert tok.decode(ids[n_prompt:]) == problems[0].solution_text + "<|im_end|>"
    assert 0.0 <= accuracy(out, problems[:4], max_new_tokens=8, batch_size=4) <= 1.0


def test_prepare_caches_by_parameters(tmp_path, capsys):
    from megatron_bpd.tasks.sft import ModelSpec, PrepConfig, prepare_teacher_and_student

    micro = ModelSpec(layers=1, hidden=32, heads=2, kv_heads=1, head_dim=16, ffn=64, steps=2, batch_size=4, warmup=1)
    cfg = PrepConfig(seed=3, difficulties=(2, 2), n_train=16, n_test=4, teacher=micro, student=micro)
    first = prepare_teacher_and_student(tmp_path, 3, config=cfg, threads=None, progress=False)
    assert not first["cached"] and 0 <= first["teacher"]["accuracy"] <= 1 and 0 <= first["student"]["accuracy"] <= 1
    assert (Path(first["teacher"]["path"]) / "config.json").exists()
    assert first["teacher"]["path"] != first["student"]["path"]
    assert "greedy accuracy" in capsys.readouterr().out
    again = prepare_teacher_and_student(tmp_path, 3, config=cfg, threads=None, progress=False)
    assert again["cached"] and again["teacher"]["accuracy"] == first["teacher"]["accuracy"]
    assert again["student"]["path"] == first["student"]["path"]
    other = prepare_teacher_and_student(tmp_path, 3, config=replace(cfg, student=replace(micro, steps=1)),
                                        threads=None, progress=False)
    assert other["teacher"]["cached"] and not other["student"]["cached"]
    assert other["student"]["path"] != first["student"]["path"]


def test_cli_writes_prompt_files_and_summary(tmp_path):
    from megatron_bpd.tasks.__main__ import main

    out = tmp_path / "out"
    main(["--out", str(out), "--difficulties", "2", "2", "--n-train", "16", "--n-test", "4", "--teacher-steps", "1",
          "--student-steps", "1", "--no-progress", "--seed", "5"])
    summary = json.loads((out / "summary.json").read_text())
    assert {"teacher", "student", "total_seconds", "train_jsonl", "test_jsonl"} <= set(summary)
    assert summary["config"]["difficulties"] == [2, 2] and summary["config"]["seed"] == 5
    train = read_problems_jsonl(out / "train.jsonl")
    test = read_problems_jsonl(out / "test.jsonl")
    assert len(train) == 16 and len(test) == 4 and not {(p.a, p.b) for p in train} & {(p.a, p.b) for p in test}


def test_corrupted_inputs_keep_gold_targets_and_touch_only_solution_digits():
    import random

    from megatron_bpd.tasks.models import task_tokenizer
    from megatron_bpd.tasks.sft import corrupt_digits, encode_example

    tok = task_tokenizer()
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    problem = make_dataset(1, 4, 4)[0]
    ids, labels = encode_example(tok, problem)
    noisy = corrupt_digits(ids, labels, digits, 0.5, random.Random(0))
    changed = [j for j, (a, b) in enumerate(zip(ids, noisy)) if a != b]
    assert len(noisy) == len(ids) and changed, "rate 0.5 on a 4-digit solution changes some digits"
    for j in changed:  # only solution digits, each replaced by another digit; the prompt is never touched
        assert labels[j] != -100 and ids[j] in digits and noisy[j] in digits
    solution_digits = sum(1 for t, y in zip(ids, labels) if y != -100 and t in digits)
    assert 0.3 * solution_digits < len(changed) < 0.7 * solution_digits
    assert corrupt_digits(ids, labels, digits, 0.0, random.Random(0)) == ids


# ---- the long-horizon task and the task registry ----

def test_running_sum_solution_and_checker():
    from megatron_bpd.tasks.running_sum import make_sum_problem, parse_sum_prompt

    p = make_sum_problem((37, 82, 15))
    assert p.prompt_text == "Sum step by step: 1:37 2:82 3:15"
    assert p.solution_text.split("\n") == ["1: 73", "2: 73+28=911", "3: 911+51=431", "answer: 134", "\\boxed{134}"]
    assert p.answer == "134" and p.difficulty == 3 and check(p.solution_text, 134)
    assert not check(p.solution_text.replace("answer: 134", "answer: 135"), 134)
    assert parse_sum_prompt(p.prompt_text) == p
    assert make_sum_problem((15, 37, 82)).key == p.key  # a reordered list is the same problem
    with pytest.raises(ValueError, match="numbered 1..n"):
        parse_sum_prompt("Sum step by step: 1:37 3:82")
    with pytest.raises(ValueError, match="not a running-sum prompt"):
        parse_sum_prompt("Add 1 + 2 column by column.")


def test_running_sum_is_long_at_the_long_horizon():
    """At 24 items the median response is >= 300 tokens (5x the addition task's ~58) in >= 15 lines."""
    import statistics

    from megatron_bpd.tasks.models import task_tokenizer
    from megatron_bpd.tasks.running_sum import make_sum_dataset

    tok = task_tokenizer(task="running_sum")
    problems = make_sum_dataset(40, 0, 24)
    lengths = [len(tok(p.solution_text, add_special_tokens=False)["input_ids"]) + 1 for p in problems]
    assert statistics.median(lengths) >= 300 and all(p.solution_text.count("\n") + 1 >= 15 for p in problems)
    assert all(n <= p.max_new_tokens for n, p in zip(lengths, problems))
    for p in problems[:5]:  # the tokenizer round-trips the task text exactly
        assert tok.decode(tok(p.prompt_text + "\n" + p.solution_text)["input_ids"]) == p.prompt_text + "\n" + \
            p.solution_text


@pytest.mark.parametrize("name", ["addition", "running_sum"])
def test_study_splits_are_disjoint_up_to_swaps_and_reorderings(name, tmp_path):
    from megatron_bpd.tasks.registry import get_task, study_splits

    task = get_task(name)
    sizes = {"sft": 3000, "train": 300, "dev": 100, "test": 500}
    s = study_splits(task, seed=0, sizes=sizes)
    assert {k: len(v) for k, v in s.items()} == sizes
    keys = {k: {p.key for p in v} for k, v in s.items()}
    assert all(len(keys[k]) == sizes[k] for k in sizes)
    names = list(sizes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not keys[a] & keys[b], (a, b)
    if name == "addition":  # and from the shipped pair's SFT set, b + a included
        from megatron_bpd.tasks.sft import PrepConfig, datasets

        shipped = {p.key for p in datasets(PrepConfig(seed=0))[0]}
        assert not shipped & (keys["dev"] | keys["test"])
        from megatron_bpd.tasks.arithmetic import parse_prompt
        assert parse_prompt("Add 12 + 345 column by column.").key == parse_prompt("Add 345 + 12 column by column.").key
    assert study_splits(task, seed=0, sizes=sizes)["test"] == s["test"]  # deterministic
    path = write_prompts_jsonl(tmp_path / "test.jsonl", s["test"][:20])
    from megatron_bpd.tasks.common import read_prompts_jsonl
    assert read_prompts_jsonl(path, task.parse_prompt) == s["test"][:20]
    with pytest.raises(ValueError, match="unknown task 'nope'; known: addition, running_sum"):
        get_task("nope")


def test_cli_prepares_a_running_sum_pair_on_its_study_split(tmp_path):
    """--task running_sum: models with that task's tokenizer, fine-tuned on the ``sft`` split and evaluated on
    ``dev``, at the requested item counts."""
    from transformers import AutoTokenizer

    from megatron_bpd.tasks.__main__ import main
    from megatron_bpd.tasks.common import read_prompts_jsonl
    from megatron_bpd.tasks.running_sum import parse_sum_prompt

    out = tmp_path / "out"
    summary = main(["--out", str(out), "--task", "running_sum", "--difficulties", "3", "4", "--n-train", "16",
                    "--n-test", "4", "--teacher-steps", "1", "--student-steps", "1", "--no-progress"])
    assert summary["config"]["task"] == "running_sum"
    train = read_prompts_jsonl(out / "train.jsonl", parse_sum_prompt)
    test = read_prompts_jsonl(out / "test.jsonl", parse_sum_prompt)
    assert len(train) == 16 and len(test) == 4 and {p.difficulty for p in train + test} <= {3, 4}
    assert not {p.key for p in train} & {p.key for p in test}
    tok = AutoTokenizer.from_pretrained(summary["teacher"]["path"])
    assert tok.tokenize("Sum")[0] == "Sum"  # the running-sum tokenizer (a merge the addition corpus lacks)


def test_study_splits_at_one_horizon_keep_the_sft_split():
    from megatron_bpd.tasks.registry import get_task, study_splits

    task = get_task("running_sum")
    sizes = {"sft": 500, "train": 50, "dev": 20, "test": 40}
    wide, long = study_splits(task, 0, sizes), study_splits(task, 0, sizes, horizon=24)
    assert long["sft"] == wide["sft"] and {p.difficulty for p in long["sft"]} == set(range(2, 25))
    assert all(p.difficulty == 24 for name in ("train", "dev", "test") for p in long[name])
    keys = [{p.key for p in long[name]} for name in sizes]
    assert sum(map(len, keys)) == len(set().union(*keys)) == sum(sizes.values())
