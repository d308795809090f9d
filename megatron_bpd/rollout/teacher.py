"""Teacher scoring through SGLang prefill-only requests.

For a trajectory with prompt x (P tokens) and response y (T tokens) the request is ``input_ids = x + y``,
``max_new_tokens = 0``, ``return_logprob``, ``top_logprobs_num = K`` and ``logprob_start_len = P - 1``. SGLang
returns one entry per position P - 1 .. P + T - 1 whose first entry is null (no log-prob at logprob_start_len), so
entries 1..T are log q(y_t | x, y_<t) and the teacher's top-K at each response position.

Temperature: prefill log-probs are log_softmax(logits) at temperature 1, whatever the rollout temperature. The
teacher is the target distribution, so the losses use it at temperature 1; behavior log-probs are at the rollout
temperature T (``TrajectoryBatch.temperature``) and the trainer computes its current log-probs with logits / T so
that the PPO ratio is exactly 1 on a fresh rollout. With T = 1 (the paper's setting) all three agree.
"""

from __future__ import annotations


import torch

from megatron_bpd.rollout.client import SGLangClient, gather_all
from megatron_bpd.rollout.protocol import GenerateOutput, GenerateRequest, ProtocolError, SamplingParams, check_logprobs
from megatron_bpd.rollout.types import TeacherScores, TrajectoryBatch


class SGLangTeacher:
    """A teacher served by SGLang (or ``megatron_bpd.serve``); ``await teacher.score(batch)`` -> TeacherScores."""

    def __init__(self, client: SGLangClient, top_k: int = 32):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.client, self.top_k = client, top_k

    async def score(self, batch: TrajectoryBatch) -> TeacherScores:
        scored = await gather_all(self._score_one(p, r) for p, r in zip(batch.prompt_ids, batch.response_ids))
        return TeacherScores(*(list(part) for part in zip(*scored))) if scored else TeacherScores([], [], [])

    async def _score_one(self, prompt: list[int], response: list[int]):
        k = self.top_k
        if not response:
            return torch.zeros(0), torch.zeros(0, k, dtype=torch.int64), torch.zeros(0, k)
        if not prompt:
            raise ValueError("teacher scoring needs a non-empty prompt")
        request = GenerateRequest(input_ids=prompt + response, rid=self.client.new_rid("teacher-"),
                                  sampling_params=SamplingParams(max_new_tokens=0, temperature=1.0,
                                                                 skip_special_tokens=False),
                                  return_logprob=True, logprob_start_len=len(prompt) - 1, top_logprobs_num=k)
        (output,) = await self.client.generate(request)
        return parse_prefill_scores(output, response, k)


def parse_prefill_scores(output: GenerateOutput, response: list[int], k: int):
    """(token_logprobs [T], topk_ids [T, K], topk_logprobs [T, K]) from a prefill response that started at
    logprob_start_len = P - 1; the leading null entry is dropped and the rest checked against ``response``."""
    where = f"teacher response {output.rid!r}"
    tokens, top = output.input_token_logprobs, output.input_top_logprobs
    t = len(response)
    if tokens is None or top is None:
        raise ProtocolError(f"{where}: input_token_logprobs / input_top_logprobs missing")
    if len(tokens.token_ids) != t + 1 or len(top) != t + 1:
        raise ProtocolError(f"{where}: expected {t + 1} input log-prob entries (null + {t} response tokens), got "
                            f"{len(tokens.token_ids)} and {len(top)} top-K rows")
    if tokens.token_ids[1:] != list(response):
        raise ProtocolError(f"{where}: input_token_logprobs token ids do not match the response tokens")
    check_logprobs(tokens.logprobs[1:], f"{where} input_token_logprobs")
    rows = top[1:]
    for i, row in enumerate(rows):
        if row is None or len(row.token_ids) != k:
            raise ProtocolError(f"{where}: input_top_logprobs[{i + 1}] has "
                                f"{'no' if row is None else len(row.token_ids)} entries, expected {k}")
        check_logprobs(row.logprobs, f"{where} input_top_logprobs[{i + 1}]")
    return (torch.tensor(tokens.logprobs[1:], dtype=torch.float32),
            torch.tensor([row.token_ids for row in rows], dtype=torch.int64),
            torch.tensor([row.logprobs for row in rows], dtype=torch.float32))
