"""One optimizer update of the trainer's CPU train phase against a plain PyTorch loop on the same model and tokens.

The model is the shipped student (``megatron_bpd/data/task_models/student``) or any HF Qwen3 folder (``--model``);
the update is the demo's: ``--micro-batches`` micro-batches of ``--micro-batch`` sequences of ``--seq`` tokens
(the first quarter prompt; ``train_step.random_rollout``), the sampled-token OPD loss, Adam. Side by side, each
repeat in the same order:

- ``hf``: plain PyTorch: the HF ``Qwen3ForCausalLM`` forward, log_softmax at the labels, the same PPO-clipped
  sampled-token loss in a few tensor ops, backward, ``torch.optim.Adam``;
- ``megatron``: Megatron-Core's GPTModel (local spec) under ``get_forward_backward_func()`` with Megatron's DDP and
  optimizer and a plain loss on its logits: what Megatron costs on its own;
- ``plugin``: the trainer's update (``train.update.Update``: ``opd_loss``, fused head, no gate);
- ``plugin+gate``: the same with the Block-16 gate.

Ratios to ``hf`` are medians over ``--repeats`` (one torch thread). ``--smoke`` runs one tiny repeat.

    OMP_NUM_THREADS=1 python bench/bench_train_step.py
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from train_step import TrainStep, random_rollout

STUDENT = Path(__file__).resolve().parents[1] / "megatron_bpd" / "data" / "task_models" / "student"


def _ppo_loss(cur, old, teacher, mask, num_tokens, clip=0.2, adv_clip=5.0):
    """The sampled-token OPD loss in plain tensor ops: -min(r A, clip(r) A), A = clamp(lp_teach - lp_old)."""
    advantage = (teacher - old).clamp(-adv_clip, adv_clip)
    ratio = torch.exp(cur - old)
    per_position = -torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
    return torch.where(mask, per_position, 0.0).sum() / num_tokens


def hf_step(model, optimizer, batches, num_tokens):
    optimizer.zero_grad(set_to_none=True)
    for mb in batches:
        logits = model(input_ids=mb.tokens).logits.float()
        cur = torch.log_softmax(logits, -1).gather(-1, mb.labels[..., None])[..., 0]
        _ppo_loss(cur, mb.old_logprobs, mb.teacher_logprobs, mb.loss_mask, num_tokens).backward()
    optimizer.step()


def megatron_step(hf_dir, batches, num_tokens):
    """Megatron-Core alone: its GPTModel, DDP and optimizer under forward_backward_func with the plain loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_bpd.train.setup import zero_grads

    plain = TrainStep(hf_dir, batches[0].tokens.shape[0], "adam", 1e-4)
    plain.reload()

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        logits = model(mb.tokens, mb.position_ids, attention_mask=None)

        def loss_func(output):
            cur = torch.log_softmax(output.float(), -1).gather(-1, mb.labels[..., None])[..., 0]
            loss = _ppo_loss(cur, mb.old_logprobs, mb.teacher_logprobs, mb.loss_mask, num_tokens)
            return loss * len(batches), {"loss": loss.detach()}
        return logits, loss_func

    def step():
        zero_grads(plain.ddp, plain.optimizer)
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches), model=[plain.ddp],
                                    num_microbatches=len(batches), seq_length=batches[0].tokens.shape[1],
                                    micro_batch_size=batches[0].tokens.shape[0], forward_only=False)
        plain.optimizer.step()
    return step


def plugin_step(hf_dir, data, micro_batch, gate, vocab):
    """The trainer's update (``train_step.TrainStep``) with the OPD loss, fused head, ``gate``."""
    from megatron_bpd.train.loss import LossConfig
    from megatron_bpd.train.metrics import MetricSums

    plugin = TrainStep(hf_dir, micro_batch, "adam", 1e-4)
    plugin.reload()
    update, _ = plugin.update(LossConfig(gate=gate, vocab_size=vocab))
    rows = list(range(len(data.trajectories)))
    return lambda: update(data, rows, MetricSums())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=STUDENT)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="one repeat of one small micro-batch")
    cli = parser.parse_args(argv)
    if cli.smoke:
        cli.micro_batches, cli.micro_batch, cli.seq, cli.repeats = 1, 2, 16, 1
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from megatron_bpd import parallel

    parallel.initialize(tp=1, seed=0)
    hf = AutoModelForCausalLM.from_pretrained(cli.model, dtype=torch.float32)
    vocab = hf.config.vocab_size
    from megatron_bpd.gating import GateConfig
    from megatron_bpd.train.rollout_data import MicroBatcher

    data = random_rollout(cli.micro_batches * cli.micro_batch, cli.seq, vocab)
    rows = list(range(len(data.trajectories)))
    batches = MicroBatcher(GateConfig(granularity="none"), cli.micro_batch)(data, rows)[1]
    num_tokens = data.num_tokens(rows)
    optimizer = torch.optim.Adam(hf.parameters(), lr=1e-4)
    steps = {"hf": lambda: hf_step(hf, optimizer, batches, num_tokens),
             "megatron": megatron_step(cli.model, batches, num_tokens),
             "plugin": plugin_step(cli.model, data, cli.micro_batch, GateConfig(granularity="none"), vocab),
             "plugin+gate": plugin_step(cli.model, data, cli.micro_batch, GateConfig(block_size=16), vocab)}
    times = {name: [] for name in steps}
    for name, step in steps.items():  # warm-up
        step()
    for _ in range(cli.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    parallel.destroy()
    base = statistics.median(times["hf"])
    print(f"{cli.model.name}: {cli.micro_batches} micro-batches x {cli.micro_batch} x {cli.seq} tokens, "
          f"{cli.repeats} repeats, 1 thread")
    print("| step | ms (median) | ms (min) | / hf |")
    print("|---|---|---|---|")
    rows = {}
    for name, values in times.items():
        rows[name] = statistics.median(values) / base
        print(f"| {name} | {1e3 * statistics.median(values):.1f} | {1e3 * min(values):.1f} | {rows[name]:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
