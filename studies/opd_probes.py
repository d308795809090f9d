"""Independent probes in plain PyTorch + transformers (no Megatron, no servers) behind docs/results/opd_regime.md:
they check what the trainer shows from outside it.

    python -m studies.opd_probes sft --pool 8  [--lr 3e-4 --updates 40]   # SFT on gold traces; --pool P: every 4
                                                                         # updates draw their 16-example batches
                                                                         # from only P problems (0: all 2000)
    python -m studies.opd_probes offline --loss fkl|rkl [--lr 3e-4 --updates 16]   # on-policy loop, 8 prompts x 2
    python -m studies.opd_probes recovery --model DIR    # teacher's greedy answer after one corrupted digit

``--student`` / ``--teacher`` default to the shipped task models. Accuracy: greedy exact match on the first 100
held-out problems (``tasks.sft.accuracy``, HF generate).
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch

from megatron_bpd.experiment import SHIPPED_MODELS
from megatron_bpd.tasks.common import check
from megatron_bpd.tasks.sft import PrepConfig, _collate, _prompt_ids, accuracy, datasets, encode_example, sft_loss


def held_out_accuracy(model, tokenizer, problems) -> float:
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return accuracy(folder, problems)


def probe_sft(args, model, tokenizer, train, test):
    """Gold-trace SFT with Adam; ``--pool`` problems shared by each group of 4 updates (the trainer's reuse of one
    rollout batch of few prompts) or fresh problems for every example."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    rng = random.Random(0)
    pool = None
    for update in range(args.updates):
        if args.pool and update % 4 == 0:
            pool = [train[rng.randrange(2000)] for _ in range(args.pool)]
        batch = [encode_example(tokenizer, pool[rng.randrange(len(pool))] if pool else train[rng.randrange(2000)])
                 for _ in range(16)]
        loss = sft_loss(model, *_collate(batch, tokenizer.pad_token_id))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (update + 1) % args.report_every == 0:
            model.eval()
            print(f"update {update + 1}: greedy {held_out_accuracy(model, tokenizer, test):.3f}", flush=True)
            model.train()


def _rollout(model, tokenizer, problems, n):
    model.eval()
    sequences = []
    for p in problems:
        prompt = _prompt_ids(tokenizer, p.prompt_text)
        x = torch.tensor([prompt] * n)
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=96, do_sample=True,
                                 temperature=1.0, top_p=0.9, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        for row in out:
            response = row[len(prompt):].tolist()
            end = response.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in response else len(response)
            sequences.append((prompt, response[:end]))
    model.train()
    width = max(len(p) + len(r) for p, r in sequences)
    ids = torch.full((len(sequences), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(sequences), width, dtype=torch.bool)
    for i, (p, r) in enumerate(sequences):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1:len(p) + len(r) - 1] = True  # logits at position t score token t + 1
    return ids, mask[:, :-1]


def probe_offline(args, model, tokenizer, train, test):
    """On-policy distillation in plain torch: the student samples 8 prompts x 2, the teacher scores every position,
    full-vocabulary forward KL (teacher -> student, 'DAgger') or reverse KL (student -> teacher)."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(args.teacher).eval()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    rng = random.Random(0)
    for update in range(args.updates):
        ids, mask = _rollout(model, tokenizer, [train[rng.randrange(2000)] for _ in range(8)], 2)
        with torch.no_grad():
            log_q = torch.log_softmax(teacher(ids).logits[:, :-1].float(), -1)
        log_p = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
        per = (log_p.exp() * (log_p - log_q)).sum(-1) if args.loss == "rkl" else -(log_q.exp() * log_p).sum(-1)
        loss = (per * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    print(f"{args.loss} after {args.updates} updates: greedy {held_out_accuracy(model, tokenizer, test):.3f}")


def probe_recovery(args, model, tokenizer, train, test):
    """One digit of the gold trace's first half replaced; does greedy decoding from there end with the answer?"""
    rng = random.Random(0)
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    solved = 0
    for p in test[:60]:
        ids, labels = encode_example(tokenizer, p)
        candidates = [j for j, (t, y) in enumerate(zip(ids, labels)) if y != -100 and t in digits]
        j = rng.choice(candidates[:len(candidates) // 2])
        context = ids[:j] + [rng.choice([d for d in digits if d != ids[j]])]
        x = torch.tensor([context])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=100, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        prompt_len = sum(1 for y in labels if y == -100)
        solved += check(tokenizer.decode(out[0][prompt_len:], skip_special_tokens=True), p.answer)
    print(f"{args.model}: correct answer after one corrupted digit in {solved}/60")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=("sft", "offline", "recovery"))
    parser.add_argument("--student", default=str(SHIPPED_MODELS / "student"))
    parser.add_argument("--teacher", default=str(SHIPPED_MODELS / "teacher"))
    parser.add_argument("--model", default=None, help="recovery: the model to probe (default: --teacher)")
    parser.add_argument("--loss", choices=("fkl", "rkl"), default="fkl")
    parser.add_argument("--pool", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--updates", type=int, default=40)
    parser.add_argument("--report-every", type=int, default=8)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    args.model = args.model or args.teacher
    path = args.model if args.probe == "recovery" else args.student
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    train, test = datasets(PrepConfig())
    test = test[:100]
    if args.probe != "recovery":
        print(f"base: greedy {held_out_accuracy(model, tokenizer, test):.3f}", flush=True)
        model.train()
    {"sft": probe_sft, "offline": probe_offline, "recovery": probe_recovery}[args.probe](args, model, tokenizer,
                                                                                      train, test)


if __name__ == "__main__":
    main()
