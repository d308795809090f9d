"""Rollout: prompts x n samples -> TrajectoryBatch, one ``/generate`` request per sample (as slime does), so a
failed request is retried alone and every sample gets its own seed."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

from megatron_bpd.rollout.client import SGLangClient, gather_all
from megatron_bpd.rollout.protocol import GenerateOutput, GenerateRequest, ProtocolError, SamplingParams, check_logprobs
from megatron_bpd.rollout.types import TrajectoryBatch


@dataclass
class RolloutConfig:
    """``seed``: sample j of prompt i uses sampling_seed = seed + i * n_samples + j (None: server-chosen).
    ``mask_token_ids``: the first occurrence of each of these ids in a response gets loss_mask 0 (method.md's
    special-token masking, e.g. the ids of "<", "think", "<|im_end|>")."""

    n_samples: int = 8
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0, top_p=0.9))
    seed: int | None = None
    mask_token_ids: Sequence[int] = ()


async def generate_rollout(client: SGLangClient, prompts: Sequence[Sequence[int]],
                           config: RolloutConfig) -> TrajectoryBatch:
    """Sample ``config.n_samples`` responses per prompt; trajectories are ordered prompt-major."""
    if config.sampling.n != 1:
        raise ValueError("RolloutConfig.sampling.n must be 1: use n_samples (one request per sample)")
    jobs = []
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        for j in range(config.n_samples):
            seed = None if config.seed is None else config.seed + i * config.n_samples + j
            request = GenerateRequest(input_ids=list(prompt),
                                      sampling_params=replace(config.sampling, sampling_seed=seed),
                                      rid=client.new_rid(f"p{i}s{j}-"), return_logprob=True)
            jobs.append(client.generate(request))
    outputs = [out[0] for out in await gather_all(jobs)]
    responses = [list(o.output_ids) for o in outputs]
    return TrajectoryBatch(
        prompt_ids=[list(prompts[k // config.n_samples]) for k in range(len(outputs))],
        response_ids=responses,
        behavior_logprobs=[behavior_logprobs(o) for o in outputs],
        loss_mask=[special_token_mask(r, config.mask_token_ids) for r in responses],
        finish_reason=[o.finish_reason for o in outputs],
        weight_version=[o.weight_version for o in outputs],
        prompt_index=[k // config.n_samples for k in range(len(outputs))],
        temperature=config.sampling.temperature if config.sampling.temperature > 0 else 1.0,
    )


def behavior_logprobs(output: GenerateOutput) -> list[float]:
    """The sampled tokens' log-probs, checked present, aligned with ``output_ids`` and finite."""
    where = f"response {output.rid!r} output_token_logprobs"
    entries = output.output_token_logprobs
    if entries is None:
        raise ProtocolError(f"{where}: missing although return_logprob was set")
    if entries.token_ids != output.output_ids:
        raise ProtocolError(f"{where}: {len(entries.token_ids)} entries do not match the {len(output.output_ids)} "
                            f"output_ids token for token")
    check_logprobs(entries.logprobs, where)
    return list(entries.logprobs)


def special_token_mask(response: Sequence[int], token_ids: Sequence[int]) -> list[int]:
    """1 everywhere except at the first occurrence of each id of ``token_ids`` in ``response``."""
    mask = [1] * len(response)
    for tok in set(token_ids):
        if tok in response:
            mask[list(response).index(tok)] = 0
    return mask
