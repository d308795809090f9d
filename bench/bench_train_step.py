"""One optimizer update of the trainer's CPU train phase against a plain PyTorch loop on the same model and tokens.

The model is the shipped student (``megatron_bpd/data/task_models/student``) or any HF Qwen3 folder (``--model``);
the update is the demo's: ``--micro-batches`` micro-batches of ``--micro-batch`` sequences of ``--seq`` tokens
(the first quarter prompt; ``train_step.random_rollout``), the sampled-token OPD loss, Adam. Side by side, each
repeat in the same order:

- ``hf``: plain PyTorch: the HF ``Qwen3ForCausalLM`` forward, log_softmax at the labels, the same PPO-clipped
  sampled-token loss in a few tensor ops, backward, ``torch.optim.Adam``;
- ``megatron``: Megatron-Core's GPTModel (local spec) under ``get_forward_backward_func()`` with Megatron's DDP and
  optimizer and a plain loss on its logits: what Megatron costs on its own;
- ``plugin``: the trainer's step (``train.forward_step`` with ``opd_loss``, fused head, no gate);
- ``plugin+gate``: the same with the Block-16 gate.

Ratios to ``hf`` are medians over ``--repeats`` (one torch thread). ``--smoke`` runs one tiny repeat.

    OMP_NUM_THREADS=1 python bench/bench_train_step.py
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from train_step import micro_batch, random_rollout

STUDENT = Path(__file__).resolve().parents[1] / "megatron_bpd" / "data" / "task_models" / "student"


def _ppo_loss(cur, old, teacher, mask, num_tokens, clip=0.2, adv_clip=5.0):
    """The sampled-token OPD loss in plain tensor ops: -min(r A, clip(r) A), A = clamp(lp_teach - lp_old)."""
    advantage = (teacher - old).clamp(-adv_clip, adv_clip)
    ratio = torch.exp(cur - old)
    per_position = -torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
    return torch.where(mask, per_position, 0.0).sum() / num_tokens


def hf_step(model, optimizer, data, num_tokens):
    optimizer.zero_grad(set_to_none=True)
    for mb in data:
        logits = model(input_ids=mb["tokens"]).logits.float()
        cur = torch.log_softmax(logits, -1).gather(-1, mb["labels"][..., None])[..., 0]
        _ppo_loss(cur, mb["old"], mb["teacher"], mb["mask"], num_tokens).backward()
    optimizer.step()


def megatron_steps(hf_dir, data, num_tokens, vocab):
    """{name: step()} for the three Megatron variants, each on its own copy of the weights."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_bpd.gating import GateConfig
    from megatron_bpd.models.qwen3 import build_model, load_hf_weights
    from megatron_bpd.train.forward_step import make_forward_step
    from megatron_bpd.train.loss import LossConfig
    from megatron_bpd.train.setup import OptimizerSettings, wrap_for_training, zero_grads

    settings = OptimizerSettings(optimizer="adam", lr=1e-4, clip_grad=0.0)
    forward_backward = get_forward_backward_func()
    steps = {}

    def plain_forward_step(data_iterator, model):
        mb = next(data_iterator)
        logits = model(mb.tokens, mb.position_ids, attention_mask=None)

        def loss_func(output):
            cur = torch.log_softmax(output.float(), -1).gather(-1, mb.labels[..., None])[..., 0]
            loss = _ppo_loss(cur, mb.old_logprobs, mb.teacher_logprobs, mb.loss_mask, num_tokens)
            return loss * len(data), {"loss": loss.detach()}
        return logits, loss_func

    for name, gate in (("megatron", None), ("plugin", GateConfig(granularity="none")),
                       ("plugin+gate", GateConfig(block_size=16))):
        model = build_model(hf_dir, transformer_impl="local")
        load_hf_weights(model, hf_dir, progress=False)
        ddp_model, optimizer = wrap_for_training(model, settings)
        batches = [micro_batch(mb, gate or GateConfig(granularity="none")) for mb in data]
        forward_step = plain_forward_step if gate is None else make_forward_step(
            LossConfig(gate=gate, vocab_size=vocab), num_tokens, len(data))

        def step(ddp_model=ddp_model, optimizer=optimizer, batches=batches, forward_step=forward_step):
            zero_grads(ddp_model, optimizer)
            forward_backward(forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp_model],
                             num_microbatches=len(batches), seq_length=batches[0].tokens.shape[1],
                             micro_batch_size=batches[0].tokens.shape[0], forward_only=False)
            optimizer.step()
        steps[name] = step
    return steps


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
    data = [random_rollout(cli.micro_batch, cli.seq, vocab)] * cli.micro_batches  # the same tokens in each
    num_tokens = sum(int(mb["mask"].sum()) for mb in data)
    optimizer = torch.optim.Adam(hf.parameters(), lr=1e-4)
    steps = {"hf": lambda: hf_step(hf, optimizer, data, num_tokens), **megatron_steps(cli.model, data, num_tokens,
                                                                                         vocab)}
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
