"""A short runnable example of drift gating under rollout reuse, on the CPU in seconds.

A student and a teacher bigram language model over a small vocabulary stand in for the two LLMs. Each step the
student samples responses (the behavior policy pi_old), the teacher scores every sampled token, and the student
trains on the rollout for ``epochs`` x ``minibatches`` optimizer steps (reuse) with the sampled-token OPD loss,
optionally the LSM loss on the teacher's top-K, each gated by ``drift_gates``. The gates are 1 on the first
update of a rollout and act as the student drifts away from the policy that sampled it.

    python -m megatron_bpd.demo --out runs/demo [--steps 30 --granularity block --block-size 8 --loss sampled_token]

Writes ``metrics.jsonl`` (one object per optimizer update) and ``gates.png`` in ``--out``.
"""

import argparse
import json
from pathlib import Path

import torch

from .gating import GRANULARITIES, GateConfig, drift_gates
from .losses import sampled_token_opd_loss, topk_lsm_loss


class Bigram(torch.nn.Module):
    """log pi(y_t | y_{t-1}) from a [V, V] logit table."""

    def __init__(self, vocab: int, scale: float, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g) * scale)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, V] for the next token after each position."""
        return self.table[tokens]

    @torch.no_grad()
    def sample(self, first: torch.Tensor, length: int, generator) -> torch.Tensor:
        """[b] start tokens -> [b, length + 1] sequences (the start token, then ``length`` sampled tokens)."""
        seq = [first]
        for _ in range(length):
            probs = torch.softmax(self.logits(seq[-1]), -1)
            seq.append(torch.multinomial(probs, 1, generator=generator).squeeze(-1))
        return torch.stack(seq, 1)


def token_logprobs(model: Bigram, seq: torch.Tensor) -> torch.Tensor:
    """[b, s + 1] sequences -> [b, s] log-probs of each sampled token given its predecessor."""
    return torch.log_softmax(model.logits(seq[:, :-1]), -1).gather(-1, seq[:, 1:, None]).squeeze(-1)


def teacher_kl(student: Bigram, teacher: Bigram) -> float:
    """Mean over contexts of KL(student || teacher), the quantity OPD drives down."""
    with torch.no_grad():
        s, t = torch.log_softmax(student.table, -1), torch.log_softmax(teacher.table, -1)
        return float((s.exp() * (s - t)).sum(-1).mean())


def run(args) -> list:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    student, teacher = Bigram(args.vocab, 1.0, args.seed), Bigram(args.vocab, 3.0, args.seed + 1)
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
    gate = GateConfig(granularity=args.granularity, block_size=args.block_size, tau=args.tau)
    records, update = [], 0
    for step in range(args.steps):
        seq = student.sample(torch.randint(args.vocab, (args.batch,), generator=generator), args.length, generator)
        mask = torch.ones(args.batch, args.length, dtype=torch.bool)
        with torch.no_grad():
            old = token_logprobs(student, seq)
            teacher_logits = teacher.logits(seq[:, :-1])
            teach = torch.log_softmax(teacher_logits, -1).gather(-1, seq[:, 1:, None]).squeeze(-1)
            top = torch.log_softmax(teacher_logits, -1).topk(args.topk, -1)
        for epoch in range(args.epochs):
            for rows in torch.randperm(args.batch, generator=generator).chunk(args.minibatches):
                logits = student.logits(seq[rows, :-1])
                cur = torch.log_softmax(logits, -1).gather(-1, seq[rows, 1:, None]).squeeze(-1)
                gates, stats = drift_gates(cur, old[rows], mask[rows], gate)
                if args.loss == "sampled_token":
                    loss, _ = sampled_token_opd_loss(cur, old[rows], teach[rows], mask[rows], gates)
                else:
                    loss, _ = topk_lsm_loss(logits.gather(-1, top.indices[rows]), top.values[rows], mask[rows], gates)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                update += 1
                records.append(dict(step=step, update=update, epoch=epoch, loss=float(loss),
                                    kl_to_teacher=teacher_kl(student, teacher),
                                    **{k: float(v) for k, v in stats.items() if v.dim() == 0}))
        last = records[-1]
        print(f"step {step:3d}  loss {last['loss']:+.4f}  KL(student||teacher) {last['kl_to_teacher']:.4f}  "
              f"|drift| {last['drift_abs_mean']:.4f}  gate min/max {last['gate_min']:.3f}/{last['gate_max']:.3f}")
    return records


def plot(records: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    updates = [r["update"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(updates, [r["kl_to_teacher"] for r in records])
    axes[0].set(title="KL(student || teacher)", xlabel="optimizer update")
    axes[1].plot(updates, [r["drift_abs_mean"] for r in records], label="token |drift|")
    axes[1].plot(updates, [r["segment_drift_abs_mean"] for r in records], label="segment |D_s|")
    axes[1].set(title="drift from the behavior policy", xlabel="optimizer update")
    axes[1].legend()
    axes[2].fill_between(updates, [r["gate_min"] for r in records], [r["gate_max"] for r in records], alpha=0.3,
                         label="min..max")
    axes[2].plot(updates, [r["gate_mean"] for r in records], label="mean")
    axes[2].set(title="normalized gates", xlabel="optimizer update")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--loss", choices=["sampled_token", "topk_lsm"], default="sampled_token")
    parser.add_argument("--granularity", choices=GRANULARITIES, default="block")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--minibatches", type=int, default=2)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    records = run(args)
    with open(args.out / "metrics.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    plot(records, args.out / "gates.png")
    print(f"wrote {args.out / 'metrics.jsonl'} and {args.out / 'gates.png'}")
    return records


if __name__ == "__main__":
    main()
