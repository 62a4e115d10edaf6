"""Each stage's own flags, and STAGE_ARGUMENTS: the classes each stage parses, in the order its
parse() unpacks them (stages/*.py and run_pipeline.sh's up-front check read this table). A flag two
stages share is declared once, in a class both take (pipeline/args/data.py) or inherit from;
tests/test_args.py checks that no flag is declared twice."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

from pipeline.args.data import ChatArguments, DataArguments, PackingArguments, RecordArguments
from pipeline.args.model import ModelArguments, PeftArguments
from pipeline.args.parsing import split_list
from pipeline.args.training import (
    CausalLMTrainingArguments,
    CompiledLayersArguments,
    PPOTrainingArguments,
    RLTrainingArguments,
    RMTrainingArguments,
)
from pipeline.data.masking import MULTI_TURN_MODES
from pipeline.errors import UserError
from pipeline.rl.group_math import VARIANTS

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class PTArguments:
    block_size: int = field(default=1024, metadata={"help": "Tokens per packed training block."})

    def __post_init__(self):
        if self.block_size < 2:
            raise UserError(f"--block_size must be at least 2, got {self.block_size}.")


@dataclass
class GenerationArguments:
    """The answer length of what a stage generates: SFT's held-out answers, the RL stages'
    rollouts."""

    max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Longest generated answer in tokens (default: SFT 512, with "
            "--predict_with_generate True only; PPO/GRPO rollouts 64)."
        },
    )
    default_max_new_tokens: ClassVar[int] = 64

    def __post_init__(self):
        if self.max_new_tokens is None:
            self.max_new_tokens = self.default_max_new_tokens
        if self.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens must be positive, got {self.max_new_tokens}.")


@dataclass
class SFTArguments(ChatArguments, RecordArguments, PackingArguments, GenerationArguments):
    multi_turn_mode: str = field(
        default="all",
        metadata={
            "help": "all turns / last turn / split into one sample per turn",
            "choices": MULTI_TURN_MODES,
        },
    )
    train_on_inputs: bool = field(
        default=False, metadata={"help": "Supervise every token, prompts included."}
    )
    neft_alpha: float = field(
        default=0.0, metadata={"help": "NEFTune noise alpha on embeddings (0 = off)."}
    )
    packing_length: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per packed row (default --model_max_length); a step holds "
            "--per_device_train_batch_size rows."
        },
    )
    loss_chunk_size: int = field(
        default=2048, metadata={"help": "Supervised tokens per output-head chunk of the loss."}
    )
    predict_with_generate: bool = field(
        default=False,
        metadata={
            "help": "At each evaluation and after training, generate the held-out answers and "
            "score ROUGE/BLEU (needs the eval extra)."
        },
    )
    default_max_new_tokens: ClassVar[int] = 512

    def __post_init__(self):
        ChatArguments.__post_init__(self)
        RecordArguments.__post_init__(self)
        given = self.max_new_tokens not in (None, self.default_max_new_tokens)
        if given and not self.predict_with_generate:
            raise UserError(
                "--max_new_tokens sets the held-out answers of --predict_with_generate True; "
                "without it SFT generates nothing: add that flag or drop --max_new_tokens."
            )
        GenerationArguments.__post_init__(self)
        if self.neft_alpha < 0:
            raise UserError(f"--neft_alpha must be >= 0, got {self.neft_alpha}.")
        if self.packing_length is not None and self.packing_length < 1:
            raise UserError(f"--packing_length must be positive, got {self.packing_length}.")
        self.packing_length = self.packing_length or self.model_max_length
        if self.packing_length < self.model_max_length:
            raise UserError(
                f"--packing_length ({self.packing_length}) must hold the longest sample, "
                f"--model_max_length ({self.model_max_length})."
            )
        if self.loss_chunk_size < 1:
            raise UserError(f"--loss_chunk_size must be positive, got {self.loss_chunk_size}.")


@dataclass
class PreferenceArguments(ChatArguments, PackingArguments):
    """RM and DPO: pairs rendered with the SFT template; the seeds' two length budgets add up to
    --model_max_length."""

    max_source_length: int | None = field(
        default=None, metadata={"help": "Seed spelling: prompt budget (adds to the answer's)."}
    )
    max_target_length: int | None = field(
        default=None, metadata={"help": "Seed spelling: answer budget."}
    )

    def __post_init__(self):
        if (self.max_source_length is None) != (self.max_target_length is None):
            raise UserError(
                "give both --max_source_length and --max_target_length, or neither (or "
                "--model_max_length)."
            )
        if self.max_source_length is not None:
            self.model_max_length = self.max_source_length + self.max_target_length
            if self.model_max_length < 8:
                raise UserError(
                    "--max_source_length + --max_target_length must be at least 8, got "
                    f"{self.model_max_length}."
                )
        ChatArguments.__post_init__(self)


@dataclass
class DPOArguments:
    loss_type: str = field(
        default="sigmoid",
        metadata={
            "help": "sigmoid (DPO), ipo, hinge, robust, kto, simpo, orpo.",
            "choices": DPO_LOSSES + REFERENCE_FREE + ("kto",),
        },
    )
    beta: float = field(
        default=0.1,
        metadata={
            "help": "DPO/KTO: pull towards the reference; SimPO: reward scale; "
            "ORPO: weight of the odds-ratio term."
        },
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "robust: assumed share of flipped labels."}
    )
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "Score the reference once up front."}
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin."})
    desirable_weight: float = field(
        default=1.0, metadata={"help": "KTO weight of desirable answers."}
    )
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "KTO weight of undesirable answers."}
    )

    def __post_init__(self):
        defaults = {f.name: f.default for f in fields(self)}
        # (--label_smoothing has its own sentence below)
        readers = {
            "simpo_gamma": ("simpo",),
            "desirable_weight": ("kto",),
            "undesirable_weight": ("kto",),
        }
        unused = [
            f"--{n}"
            for n, losses in readers.items()
            if getattr(self, n) != defaults[n] and self.loss_type not in losses
        ]
        if unused:
            raise UserError(
                f"{', '.join(unused)}: not read by --loss_type {self.loss_type}; drop them or "
                "choose the loss they belong to (--help names it)."
            )
        if self.precompute_ref_log_probs and self.loss_type in REFERENCE_FREE:
            raise UserError(
                f"--loss_type {self.loss_type} uses no reference model; drop "
                "--precompute_ref_log_probs."
            )
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        # trl's sigmoid loss never reads label_smoothing (no cDPO): refuse rather than train plain
        # DPO silently
        if self.label_smoothing and self.loss_type != "robust":
            raise UserError(
                "--label_smoothing applies to --loss_type robust (noise-robust DPO), not "
                f"{self.loss_type}."
            )


def algorithm_elsewhere(algorithm: str) -> str:
    """The sentence that sends an algorithm to the script that runs it."""
    if algorithm == "ppo":
        return (
            "stages/grpo.py runs --algorithm grpo, dapo, dr_grpo, gspo or rloo; PPO runs in "
            "stages/ppo.py (bash run_ppo.sh)."
        )
    return (
        f"--algorithm {algorithm} runs in its own script with the same flags: "
        f"bash run_grpo.sh --algorithm {algorithm} ... (stages/grpo.py)."
    )


@dataclass
class PPOArguments(ChatArguments, RecordArguments, GenerationArguments):
    """PPO's flags; the group algorithms (GroupRelativeArguments) take them too and refuse the
    PPO-only ones."""

    algorithm: str | None = field(
        default=None,
        metadata={
            "help": "ppo (stages/ppo.py, its default); grpo (stages/grpo.py's default), dapo, "
            "dr_grpo, gspo or rloo (stages/grpo.py).",
            "choices": ("ppo", *VARIANTS),
        },
    )
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Merged RM folder or RM adapter folder."}
    )
    reward_funcs: str | None = field(
        default=None,
        metadata={
            "help": "Comma list of rewards, summed: model (the reward model), exact_match (answer "
            "equals the data's). Default: model."
        },
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of rollouts (> 0)."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of rollouts."})
    ppo_epochs: int | None = field(
        default=None,
        metadata={
            "help": "Passes over each rollout batch (default 4; GRPO/RLOO: their num_iterations, "
            "default 1)."
        },
    )
    mini_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Rollouts per optimizer step (default: --per_device_train_batch_size, one "
            "update per epoch)."
        },
    )
    kl_coef: float = field(
        default=0.05,
        metadata={"help": "Per-token KL penalty against the reference (GRPO/RLOO: beta)."},
    )
    target_kl: float | None = field(
        default=None, metadata={"help": "Adaptive KL: steer kl_coef so the KL tracks this."}
    )
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive KL horizon (in rollouts)."})
    kl_estimator: str = field(
        default="k1",
        metadata={"help": "k1 (log ratio) or k3 (never negative).", "choices": ("k1", "k3")},
    )
    gamma: float = field(default=1.0, metadata={"help": "GAE discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange: float = field(
        default=0.2,
        metadata={
            "help": "Policy ratio clip. DAPO and GSPO have their own (0.2/0.28, 3e-4/4e-4); given, "
            "it replaces them (the same on both sides)."
        },
    )
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Whiten the shaped per-token rewards."}
    )
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={"help": "Subtracted from the score of answers cut off without a stop token."},
    )
    rollout_cache: str = field(
        default="auto",
        metadata={
            "help": "KV cache of rollouts: static (a fixed-size cache with transformers' compiled "
            "decode step; prompts padded to --model_max_length - --max_new_tokens and short "
            "batches filled, so it compiles once a run; falls back to dynamic with a log line "
            "where it cannot compile; float32 weights decode from a bf16 copy), dynamic, or auto "
            "(static on a CUDA GPU except under ZeRO-3; dynamic elsewhere). With stages/grpo.py "
            "--rl_engine trl: the held-out evaluation's only (trl generates its own rollouts).",
            "choices": ("auto", "static", "dynamic"),
        },
    )
    default_algorithm: ClassVar[str] = "ppo"
    algorithms: ClassVar[tuple[str, ...]] = ("ppo",)  # what this stage's script runs

    def __post_init__(self):
        # the reward module loads models: imported only when an RL stage parses
        from pipeline.rl.rewards import RULE_REWARDS

        self.algorithm = self.algorithm or self.default_algorithm
        if self.algorithm not in self.algorithms:  # before the checks of the other script's flags
            raise UserError(algorithm_elsewhere(self.algorithm))
        ChatArguments.__post_init__(self)
        RecordArguments.__post_init__(self)
        GenerationArguments.__post_init__(self)
        if self.temperature <= 0:
            raise UserError(
                f"--temperature must be > 0 for sampled rollouts, got {self.temperature}."
            )
        if self.model_max_length <= self.max_new_tokens:
            raise UserError(
                f"--model_max_length ({self.model_max_length}) must exceed --max_new_tokens "
                f"({self.max_new_tokens})."
            )
        funcs = split_list(self.reward_funcs or "model")
        unknown = [f for f in funcs if f != "model" and f not in RULE_REWARDS]
        if unknown:
            raise UserError(
                f"--reward_funcs: unknown {unknown}; use model and/or {', '.join(RULE_REWARDS)}."
            )
        if "model" in funcs and not self.reward_model_name_or_path:
            raise UserError(
                "--reward_funcs model needs --reward_model_name_or_path (the RM stage's output), "
                "or pass a rule reward such as --reward_funcs exact_match."
            )
        if self.algorithm == "ppo" and not self.reward_model_name_or_path:
            raise UserError(
                "--algorithm ppo initializes its value model from the reward model: "
                "pass --reward_model_name_or_path."
            )
        self.reward_func_list = funcs
        if self.ppo_epochs is None:
            self.ppo_epochs = 4 if self.algorithm == "ppo" else 1
        if self.ppo_epochs < 1:
            raise UserError(f"--ppo_epochs must be at least 1, got {self.ppo_epochs}.")

    @property
    def prompt_budget(self) -> int:
        """Longest prompt in tokens: what is left of --model_max_length after the answer."""
        return self.model_max_length - self.max_new_tokens


@dataclass
class GroupRelativeArguments(PPOArguments):
    num_generations: int = field(
        default=4, metadata={"help": "Answers sampled per prompt (a group)."}
    )
    rl_engine: str = field(
        default="own",
        metadata={
            "help": "own (the project's loop, every algorithm) or trl (trl's "
            "GRPOTrainer/RLOOTrainer: grpo, rloo).",
            "choices": ("own", "trl"),
        },
    )
    default_algorithm: ClassVar[str] = "grpo"
    algorithms: ClassVar[tuple[str, ...]] = tuple(VARIANTS)


# The classes each stage parses, in the order its parse() unpacks them.
STAGE_ARGUMENTS: dict[str, tuple[type, ...]] = {
    "pt": (ModelArguments, DataArguments, PeftArguments, PTArguments, CausalLMTrainingArguments),
    "sft": (ModelArguments, DataArguments, PeftArguments, SFTArguments, CausalLMTrainingArguments),
    "rm": (ModelArguments, DataArguments, PeftArguments, PreferenceArguments, RMTrainingArguments),
    "dpo": (
        ModelArguments,
        DataArguments,
        PeftArguments,
        PreferenceArguments,
        DPOArguments,
        CompiledLayersArguments,
    ),
    "ppo": (ModelArguments, DataArguments, PeftArguments, PPOArguments, PPOTrainingArguments),
    "grpo": (
        ModelArguments,
        DataArguments,
        PeftArguments,
        GroupRelativeArguments,
        RLTrainingArguments,
    ),
}
