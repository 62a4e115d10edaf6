"""Rollouts for the RL stages: a batch of prompts becomes a `Trajectory` (prompt + sampled answer
tokens, masks, decoded answers), which is scored and read by the policy, the reference and the value
model.

`Rollouts.evaluate` is the held-out evaluation of PPO, GRPO and RLOO: greedy answers, mean reward,
exact match with the data, and the exact KL to the reference.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from pipeline.data.collators import pad
from pipeline.data.prompts import Prompt
from pipeline.errors import first_line
from pipeline.infer.generation import generate, plain_sampling, sampling_config
from pipeline.model.adapters import unwrap
from pipeline.model.attention import PACKED_VARLEN, torch_varlen_available
from pipeline.model.head import check_head, final_hidden, output_head
from pipeline.model.unpadding import Flat, flatten, keeps_rows_apart
from pipeline.rl import ppo_math
from pipeline.rl.decode_copy import HalfCopy
from pipeline.rl.frozen import Frozen
from pipeline.rl.rewards import RULE_REWARDS, RewardScorer, total_rewards


@dataclass
class Trajectory:
    """One rollout batch: ids = left-padded prompt + answer (query_len prompt columns), and its
    masks."""

    prompts: list[Prompt]
    ids: torch.Tensor
    mask: torch.Tensor
    query_len: int
    response_mask: torch.Tensor  # over the answer columns: 1 up to and including the stop token
    ended: torch.Tensor  # (batch,) whether a stop token came
    answers: list[str]
    nonfinite: bool = (
        False  # the policy's logits held NaN/inf during generation (pipeline/infer/generation.py)
    )

    @property
    def responses(self) -> torch.Tensor:
        return self.ids[:, self.query_len :]

    def select(self, idx: torch.Tensor) -> Trajectory:
        """The rows `idx` (a minibatch); prompts and answers are left out, the loss does not read
        them."""
        return Trajectory(
            [],
            self.ids[idx],
            self.mask[idx],
            self.query_len,
            self.response_mask[idx],
            self.ended[idx],
            [],
        )


logger = logging.getLogger(__name__)
_SAID_PADDED: weakref.WeakSet = weakref.WeakSet()  # models whose rows run padded
LOGIT_CHUNK = 1024  # answer positions sent through the output head at a time


def _flat_answer_index(traj: Trajectory) -> tuple[Flat, torch.Tensor, torch.Tensor]:
    """The rollout rows laid end to end without their padding (pipeline/model/unpadding.py), and
    for every padded answer column that predicts a token (columns query_len-1 .. width-2) the flat
    index of its state and whether it exists (a column after a row's stop token has none)."""
    flat = flatten(traj.ids, traj.mask)
    keep = flat.keep
    flat_index = (keep.flatten().cumsum(0) - 1).view(keep.shape)[:, traj.query_len - 1 : -1]
    present = keep[:, traj.query_len - 1 : -1]
    return flat, flat_index.clamp(min=0), present


def answer_states(
    flat_hidden: torch.Tensor, flat_index: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """(rows, answer columns, hidden) from a flattened forward's (1, tokens, hidden); zeros where no
    state."""
    return flat_hidden[0, flat_index] * present.unsqueeze(-1).to(flat_hidden.dtype)


@contextmanager
def packed_attention(*models):
    """Rows laid end to end attend within their own row: PyTorch's varlen kernel on a CUDA GPU in
    half precision (model/attention.py), elsewhere SDPA with transformers' block-diagonal mask built
    from the position ids. Held over a whole update (forward and backward): gradient checkpointing
    recomputes the forward in the backward pass, which must attend the same way."""
    with ExitStack() as stack:
        for model in models:
            if model is not None:
                stack.enter_context(_packed_attention(model))
        yield


@contextmanager
def _packed_attention(model):
    base = unwrap(model)
    # half-precision weights only: full training's float32 masters under autocast failed gradient
    # checkpointing's recomputation check with this kernel on an H200 (41 tensors saved, 40
    # recomputed); they keep SDPA
    half = base.dtype in (torch.bfloat16, torch.float16)
    current = base.config._attn_implementation
    if current != "sdpa" or not (half and torch_varlen_available()):
        yield  # flash attention reads the position ids itself; SDPA builds the mask
        return
    base.set_attn_implementation(PACKED_VARLEN)
    try:
        yield
    finally:
        base.set_attn_implementation(current)


def response_hidden(
    model, traj: Trajectory, packed: bool = True
) -> tuple[torch.Tensor, torch.nn.Module]:
    """(final hidden states at the positions that predict the answer tokens, the output head). The
    model computes one position's logits only (logits_to_keep=1); the head is applied by the caller,
    in chunks. packed (the default): the rows go through the model end to end without their padding
    (prompts are left-padded to the longest, answers right-padded after the stop token); False: the
    padded batch."""
    head = output_head(model)
    check_head(model, traj.ids, head)
    if packed and _rows_apart(
        model,
        unwrap(model),
        lambda i, p, b: final_hidden(model, input_ids=i, position_ids=p, **b)[0],
    ):
        flat, flat_index, present = _flat_answer_index(traj)
        with packed_attention(model):
            hidden, _ = final_hidden(
                model, input_ids=flat.ids, position_ids=flat.positions, **flat.bounds
            )
        return answer_states(hidden, flat_index, present), head
    positions = (traj.mask.cumsum(1) - 1).clamp(min=0)
    hidden, _ = final_hidden(
        model, input_ids=traj.ids, attention_mask=traj.mask, position_ids=positions
    )
    return hidden[:, traj.query_len - 1 : -1], head


def _chunk_logprobs(hidden, tokens, head, temperature):
    logits = head(hidden).float() / temperature
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def _chunk_entropy(hidden, head, temperature):
    logp = torch.log_softmax(head(hidden).float() / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


def chunked_logprobs(
    hidden: torch.Tensor,
    head,
    tokens: torch.Tensor,
    temperature: float,
    with_entropy: bool = False,
    chunk: int = LOGIT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(token) (and, without gradient, the entropy) at every answer position, LOGIT_CHUNK
    positions through the head at a time; under autograd each chunk's logits are recomputed in the
    backward pass, so no [batch, answer, vocabulary] tensor is ever held. Equal to
    ppo_math.token_logprobs / entropy on the model's logits."""
    flat, targets = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    logps, entropies = [], []
    check = (
        "none" if is_deepspeed_zero3_enabled() else "default"
    )  # the frozen head's shard: losses.causal_lm_loss_sum
    for start in range(0, len(targets), chunk):
        part = slice(start, start + chunk)
        if torch.is_grad_enabled():
            logps.append(
                checkpoint(
                    _chunk_logprobs,
                    flat[part],
                    targets[part],
                    head,
                    temperature,
                    use_reentrant=False,
                    determinism_check=check,
                )
            )
        else:
            logps.append(_chunk_logprobs(flat[part], targets[part], head, temperature))
        if with_entropy:
            with torch.no_grad():
                entropies.append(_chunk_entropy(flat[part], head, temperature))
    logp = torch.cat(logps).view(tokens.shape)
    return logp, torch.cat(entropies).view(tokens.shape) if with_entropy else None


def chunked_full_kl(hidden, head, ref_hidden, ref_head, chunk: int = LOGIT_CHUNK) -> torch.Tensor:
    """ppo_math.full_kl at every answer position, from both models' hidden states, in chunks."""
    flat, ref_flat = (
        hidden.reshape(-1, hidden.shape[-1]),
        ref_hidden.reshape(-1, ref_hidden.shape[-1]),
    )
    parts = [
        ppo_math.full_kl(head(flat[i : i + chunk]), ref_head(ref_flat[i : i + chunk]))
        for i in range(0, len(flat), chunk)
    ]
    return torch.cat(parts).view(hidden.shape[:2])


def _rows_apart(model, base, forward) -> bool:
    """Whether the model's rows may run end to end (unpadding.keeps_rows_apart, through the
    packed attention the rows get); a model that would let them attend to each other runs them
    padded, said once."""
    if base in _SAID_PADDED:
        return False

    def packed(ids, positions, bounds):
        with packed_attention(model):
            return forward(ids, positions, bounds)

    if keeps_rows_apart(base, packed):
        return True
    _SAID_PADDED.add(base)
    logger.warning(
        "%s does not keep rows laid end to end apart (its attention does not read the position "
        "ids): its rollout rows run padded",
        type(base).__name__,
    )
    return False


def token_logprobs_and_entropy(
    model, traj: Trajectory, temperature: float, with_entropy: bool = True, packed: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs, entropies) of the answer tokens under `model`, without full-vocabulary logits."""
    hidden, head = response_hidden(model, traj, packed)
    return chunked_logprobs(hidden, head, traj.responses, temperature, with_entropy)


def values(value_model, traj: Trajectory, packed: bool = True) -> torch.Tensor:
    """The value of every state that predicts an answer token (as response_hidden: padding-free by
    default)."""
    if packed and _rows_apart(
        value_model.classifier,
        unwrap(value_model.classifier),
        lambda i, p, b: value_model.states(i, None, p, **b),
    ):
        flat, flat_index, present = _flat_answer_index(traj)
        with packed_attention(value_model.classifier):
            hidden = value_model.states(flat.ids, None, flat.positions, **flat.bounds)
        return value_model.head(answer_states(hidden, flat_index, present))
    positions = (traj.mask.cumsum(1) - 1).clamp(min=0)
    return value_model(traj.ids, traj.mask, positions, keep_from=traj.query_len - 1)[:, :-1]


def autocast_for(training_args):
    device = training_args.device.type
    if training_args.bf16:
        return torch.autocast(device, dtype=torch.bfloat16)
    return torch.autocast(device, dtype=torch.float16) if training_args.fp16 else nullcontext()


class Rollouts:
    """Generation from the policy, reference log-probs, reward scores, and the held-out evaluation:
    the part of an RL step that reads the models without training them (the recipes in loop.py and
    stages/grpo.py hold one)."""

    def __init__(
        self,
        policy,
        reference: Frozen | None,
        scorer: RewardScorer | None,
        tokenizer,
        template,
        ppo_args,
        training_args,
    ):
        self.policy, self.reference, self.scorer = policy, reference, scorer
        self.tokenizer, self.template, self.ppo_args = tokenizer, template, ppo_args
        self.device, self.autocast = training_args.device, autocast_for(training_args)
        self.rank, self.world = training_args.process_index, training_args.world_size
        self.batch_size = training_args.per_device_train_batch_size
        self.eval_batch_size = (
            training_args.per_device_eval_batch_size
        )  # the held-out evaluation's batches
        self.generation_context = (
            nullcontext  # ZeRO-3: gathers the policy's weights for the rollout (engine.py)
        )
        self.static_failed = (
            False  # the compiled static-cache decode failed once: dynamic from then on
        )
        self.said_dynamic = False
        self.half_copy: HalfCopy | None = (
            None  # full training's float32 masters cast for the decode, made at first use
        )

    def cache_kind(self) -> str:
        """static (a fixed-size KV cache: transformers compiles the decode step once) on a CUDA GPU
        under auto; dynamic elsewhere (no compiler gain on the CPU), under DeepSpeed ZeRO-3, and
        after the static path failed once. Full training's float32 masters decode static from their
        half-precision copy (decode_copy.py)."""
        kind = getattr(self.ppo_args, "rollout_cache", "dynamic")
        if kind == "auto":
            # ZeRO-3 gathers the weights into new memory for every rollout, under a graph captured
            # at fixed addresses
            why = (
                "DeepSpeed ZeRO-3 gathers the policy's weights anew for each rollout"
                if is_deepspeed_zero3_enabled()
                else None
            )
            kind = "static" if self.device.type == "cuda" and why is None else "dynamic"
            if self.device.type == "cuda" and why and not self.said_dynamic:
                logger.info("rollouts use the dynamic KV cache: %s", why)
                self.said_dynamic = True
        return "dynamic" if self.static_failed else kind

    def decoder(self, static: bool) -> torch.nn.Module:
        """The model a rollout decodes with: the policy, or for float32 weights under a
        half-precision autocast with the static cache (full training on a GPU) their half-precision
        copy, refreshed from the masters."""
        master = unwrap(self.policy)
        if not static or master.dtype != torch.float32 or isinstance(self.autocast, nullcontext):
            return self.policy
        if any(
            not p.is_floating_point() or type(p) is not torch.nn.Parameter
            for p in master.parameters()
        ):
            return (
                self.policy
            )  # quantized weights (packed bytes with their own parameter types) are not cast
        if self.half_copy is None:
            self.half_copy = HalfCopy(master, self.autocast.fast_dtype)
            logger.info(
                "rollouts decode from a %s copy of the policy's float32 weights, "
                "refreshed before each "
                "rollout (%.1f GiB)",
                str(self.autocast.fast_dtype).removeprefix("torch."),
                sum(p.numel() for p in master.parameters()) * 2 / 2**30,
            )
        return self.half_copy.refresh()

    def static_shape(self, rows: int, longest: int) -> tuple[int, int]:
        """(rows, prompt width) of a static rollout: the rows filled up to the batch size and the
        prompts padded to the prompt budget, so the decode step compiles once in a run (a compile
        costs ~40 s on the 1B shape, more than the longer cache costs in the decode steps of a run;
        measured on an H200, bench/results)."""
        return max(rows, self.batch_size), max(
            self.ppo_args.model_max_length - self.ppo_args.max_new_tokens, longest
        )

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], sample: bool) -> Trajectory:
        static = self.cache_kind() == "static"
        longest = max(len(p.ids) for p in prompts)
        rows, width = (
            self.static_shape(len(prompts), longest) if static else (len(prompts), longest)
        )
        # the extra rows (a short last batch) repeat the first prompt and are dropped after
        # generation
        filled = [p.ids for p in prompts] + [prompts[0].ids] * (rows - len(prompts))
        query, qmask = pad(filled, self.tokenizer.pad_token_id, side="left")
        if width > longest:
            query = torch.cat(
                [torch.full((rows, width - longest), self.tokenizer.pad_token_id), query], 1
            )
            qmask = torch.cat([torch.zeros((rows, width - longest), dtype=qmask.dtype), qmask], 1)
        query, qmask = query.to(self.device), qmask.to(self.device)
        base = unwrap(self.policy).generation_config
        # sampling reads the full distribution (top_k 0), as the log-probs of the update do
        args = self.ppo_args
        config = (
            sampling_config(base, args.max_new_tokens, args.temperature, args.top_p, top_k=0)
            if sample
            else sampling_config(base, args.max_new_tokens)
        )
        if static:
            config.cache_implementation = "static"
        decoder = self.decoder(static)
        plain = plain_sampling(decoder, config) if sample else nullcontext()
        with self.autocast, self.generation_context(), plain:
            try:
                out = generate(
                    decoder, query, qmask, config, allow_nonfinite=True
                )  # the loop counts such a step
            except Exception as e:  # noqa: BLE001  the compiler only: a model's own error is raised
                if not static or not type(e).__module__.startswith(
                    ("torch._dynamo", "torch._inductor")
                ):
                    raise
                logger.warning(
                    "--rollout_cache static: the decode step could not be compiled here (%s); "
                    "rollouts "
                    "use the dynamic cache from now on",
                    first_line(e),
                )
                self.static_failed = True
                return self.generate(prompts, sample)
        n = len(prompts)
        query, qmask = query[:n], qmask[:n]
        responses, rmask, ended = out.responses[:n], out.mask[:n], out.ended[:n]
        answers = [
            self.tokenizer.decode(r[: int(m.sum())], skip_special_tokens=True).strip()
            for r, m in zip(responses, rmask)
        ]
        return Trajectory(
            prompts,
            torch.cat([query, responses], 1),
            torch.cat([qmask, rmask], 1),
            query.shape[1],
            rmask,
            ended,
            answers,
            out.nonfinite,
        )

    def reference_logprobs(self, traj: Trajectory, temperature: float) -> torch.Tensor:
        with self.reference.use() as reference:
            return token_logprobs_and_entropy(reference, traj, temperature, with_entropy=False)[0]

    def scores(self, traj: Trajectory) -> torch.Tensor:
        return total_rewards(
            traj.prompts,
            traj.answers,
            self.ppo_args.reward_func_list,
            self.template,
            self.scorer,
            self.device,
        )

    def held_out_kl(self, traj: Trajectory) -> torch.Tensor:
        hidden, head = response_hidden(self.policy, traj)
        with self.reference.use() as reference:
            return chunked_full_kl(hidden, head, *response_hidden(reference, traj))

    @torch.no_grad()
    def evaluate(self, eval_prompts: list[Prompt]) -> dict[str, float]:
        self.policy.eval()
        mine = eval_prompts[self.rank :: self.world]
        sums = torch.zeros(
            6, dtype=torch.float64, device=self.device
        )  # score, exact match, kl, length, count, count with a reference answer
        for start in range(0, len(mine), self.eval_batch_size):
            traj = self.generate(mine[start : start + self.eval_batch_size], sample=False)
            with self.autocast:
                scores = self.scores(traj)
                # exact KL over the vocabulary at each answer position (greedy answers are not
                # samples of the policy)
                kl = (
                    self.held_out_kl(traj)
                    if self.reference is not None
                    else torch.full_like(traj.response_mask, float("nan"), dtype=torch.float)
                )
            answered = [(a, p.reference) for a, p in zip(traj.answers, traj.prompts) if p.reference]
            matches = RULE_REWARDS["exact_match"](*zip(*answered)) if answered else []
            sums += torch.tensor(
                [
                    scores.sum().item(),
                    sum(matches),
                    (kl * traj.response_mask).sum().item(),
                    traj.response_mask.sum().item(),
                    len(traj.prompts),
                    len(answered),
                ],
                dtype=torch.float64,
                device=self.device,
            )
        if self.world > 1:
            dist.all_reduce(sums)
        n = max(sums[4].item(), 1)
        figures = {
            "eval_score": sums[0].item() / n,
            "eval_kl": sums[2].item() / n,
            "eval_response_length": sums[3].item() / n,
            "eval_samples": int(sums[4].item()),
        }
        if sums[5].item():  # over the held-out prompts whose data gives an answer
            figures["eval_exact_match"] = sums[1].item() / sums[5].item()
        return figures
