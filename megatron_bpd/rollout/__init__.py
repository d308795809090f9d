"""Rollout layer: SGLang client, rollouts, teacher scoring, weight sync, the reuse schedule, the servers of a run
(``servers``) and the overlapped rollout producer (``producer``)."""

from megatron_bpd.rollout.client import ClientConfig, ServerError, SGLangClient
from megatron_bpd.rollout.protocol import GenerateOutput, GenerateRequest, ProtocolError, SamplingParams
from megatron_bpd.rollout.rollout import RolloutConfig, generate_rollout, special_token_mask
from megatron_bpd.rollout.teacher import SGLangTeacher
from megatron_bpd.rollout.types import TeacherScores, TrajectoryBatch

__all__ = ["ClientConfig", "GenerateOutput", "GenerateRequest", "ProtocolError", "RolloutConfig", "SGLangClient",
           "SGLangTeacher", "SamplingParams", "ServerError", "TeacherScores", "TrajectoryBatch", "generate_rollout",
           "special_token_mask"]
