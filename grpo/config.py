"""One typed configuration for both stages, parsed by transformers' `HfArgumentParser`.

Every knob is a dataclass field with its help text. Checks that involve one dataclass live in its
`__post_init__`; checks that span several (the generation batch against the micro-batch, the stage
against the checkpoint) live in `validate`. Every error names the flag and says what to change.

    python train.py --help                       # every flag, in tiers (HELP_TIERS)
    python train.py --config run.yaml --beta 0   # a YAML/JSON file, CLI flags override it

Counting conventions (GRPO stage), per rank:
    one generation batch   = per_device_prompts (B) x num_generations (G) completions
    one inner epoch        = steps_per_generation optimizer steps over that batch, each on
                             B*G / steps_per_generation completions, in micro-batches of
                             micro_batch_size (gradient accumulation)
    one generation batch   -> num_iterations * steps_per_generation optimizer steps
`max_steps` counts optimizer steps; a new generation batch is sampled every
num_iterations * steps_per_generation of them.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from data.loading import SYNTHETIC
from data.prompts import SYSTEM_PROMPT
from data.synthetic import (  # the generator owns its options
    GRID_CELLS,
    LAYOUTS,
    PALETTE,
    QUESTION_KINDS,
    SHIFTED_PALETTE,
    TRACES,
)
from grpo.advantages import ADVANTAGE_SCALES  # the math modules own their option lists
from grpo.engine.decoders import DECODE_MODES
from grpo.engine.sampling import MIN_TEMPERATURE
from grpo.objectives import (
    LOSS_TYPES,
    LossOptionError,
    LossOptions,
)
from grpo.rewards import parse_reward_weights
from models.freeze import FREEZE_POLICIES, canonical_freeze_policy
from models.loading import ATTN_IMPLEMENTATIONS, DTYPE_NAMES
from models.lora import LANGUAGE_PROJECTIONS

# LossOptions' fields whose flag has another name (GRPO's epsilon is the lower clip; the
# aggregation is --loss_aggregation); every other field is its flag.
LOSS_OPTION_FLAGS = {"epsilon_low": "epsilon", "aggregation": "loss_aggregation"}
SCHEDULES = ("constant", "cosine")
STAGES = ("sft", "grpo")
SMALLEST_IMAGE_PIXELS = 28 * 28  # one merged image token of Qwen2.5-VL: the processor never makes an image smaller
REPORT_TO = ("tensorboard", "wandb")  # the import name is the package name for both


def _help(text: str, aliases: list[str] | None = None, **kwargs):
    """A dataclass field with its --help text (and other names the flag answers to, e.g. TRL's)."""
    metadata = {"help": text} | ({"aliases": aliases} if aliases else {})
    return field(metadata=metadata, **kwargs)


class ConfigError(ValueError):
    """A setting that cannot work; the message names the flag and the fix."""


def _reject_non_finite(args) -> None:
    """NaN and inf pass every `<`/`>` check (each comparison is False), so refuse them first."""
    for f in fields(args):
        value = getattr(args, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name} {value}: must be a finite number")


def check_pixel_range(min_pixels: int | None, max_pixels: int | None) -> None:
    """--min_pixels / --max_pixels (train.py and eval.py): the processor refuses a bad range only when
    the model loads, with a traceback."""
    if max_pixels is not None and max_pixels < SMALLEST_IMAGE_PIXELS:
        raise ConfigError(
            f"--max_pixels {max_pixels}: must be >= {SMALLEST_IMAGE_PIXELS} (28 x 28, one image token), or leave it "
            "unset (the blog post uses 65536)"
        )
    if min_pixels is not None and min_pixels < 1:
        raise ConfigError(f"--min_pixels {min_pixels}: must be >= 1, or leave it unset")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ConfigError(f"--min_pixels {min_pixels} is above --max_pixels {max_pixels}; lower --min_pixels")


@dataclass
class ModelArguments:
    model: str = _help(
        "Policy to train: a hub id (Qwen/Qwen2.5-VL-3B-Instruct), a local directory written by "
        "save_pretrained, or 'tiny' for the built-in offline preset.",
        default="tiny",
    )
    init_from: str | None = _help(
        "Start from this checkpoint's weights (e.g. the SFT stage's output_dir or one of its "
        "checkpoint-N/model folders). The reference model for GRPO is this starting point.",
        default=None,
    )
    dtype: str = _help(
        "float32 | bfloat16 | float16 | auto (float32 on CPU, bfloat16 on GPU) | float64 (slow; for "
        "checking that two settings compute the same run, where float32 rounding would blur it).",
        default="auto",
    )
    attn_implementation: str = _help("sdpa | eager | flash_attention_2.", default="sdpa")
    max_pixels: int | None = _help("Largest image area the processor keeps (the blog post uses 65536 = 256*256).", default=None)
    min_pixels: int | None = _help("Smallest image area the processor keeps.", default=None)
    freeze_policy: str = _help(
        "Which parameters train: full | language (vision frozen) | projector_embeddings_first_layers (the blog post's "
        "recipe: the vision merger's output projection merger.mlp.2, the embeddings and the first "
        "--num_trainable_layers language layers; old name: seed) | lora.",
        default="full",
    )
    num_trainable_layers: int = _help("Language layers that train under --freeze_policy projector_embeddings_first_layers.", default=5)
    lora_r: int = _help("LoRA rank (--freeze_policy lora).", default=8)
    lora_alpha: float = _help("LoRA alpha; the update is scaled by alpha / r.", default=32.0)
    lora_dropout: float = _help("Dropout on the LoRA input.", default=0.0)
    lora_targets: str = _help("Comma-separated projection names that get LoRA adapters.", default="q_proj,v_proj")
    gradient_checkpointing: bool = _help("Recompute activations in the backward pass to save memory.", default=False)

    def __post_init__(self):
        _reject_non_finite(self)
        for name in ("model", "init_from"):  # '' (an unset shell variable): --init_from '' started from --model
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise ConfigError(f"--{name} is empty (an unset shell variable, e.g. --{name} $CKPT?); give the model folder")
        self.freeze_policy = canonical_freeze_policy(self.freeze_policy)  # "seed" still works, with a warning
        if self.freeze_policy not in FREEZE_POLICIES:
            raise ConfigError(f"--freeze_policy {self.freeze_policy!r} is not one of {FREEZE_POLICIES}")
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"--dtype {self.dtype!r}: use {', '.join(DTYPE_NAMES[:-1])} or {DTYPE_NAMES[-1]}")
        if self.num_trainable_layers < 0:
            raise ConfigError("--num_trainable_layers must be >= 0")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"--attn_implementation {self.attn_implementation!r}: use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
        check_pixel_range(self.min_pixels, self.max_pixels)
        targets = [name.strip() for name in self.lora_targets.split(",") if name.strip()]
        unknown = [name for name in targets if name not in LANGUAGE_PROJECTIONS]
        if self.freeze_policy == "lora" and (unknown or not targets):  # an unknown name would be skipped silently
            raise ConfigError(
                f"--lora_targets {self.lora_targets!r}: give a comma list of Qwen2.5-VL's language projections "
                f"({','.join(LANGUAGE_PROJECTIONS)}), e.g. q_proj,v_proj"
            )
        if self.lora_r < 1 or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora_r {self.lora_r} / --lora_dropout {self.lora_dropout}: need r >= 1 and dropout in [0, 1)")
        if self.freeze_policy == "lora" and self.lora_alpha <= 0:  # alpha / r scales the update: 0 never trains
            raise ConfigError(
                f"--lora_alpha {self.lora_alpha}: must be > 0 (the LoRA update is scaled by alpha / r, so 0 makes "
                "every gradient exactly 0); the usual choice is 2 * --lora_r or the default 32"
            )


@dataclass
class DataArguments:
    dataset: str = _help(
        "Training data: 'synthetic' (built-in counting scenes), a hub name, a save_to_disk folder, "
        "a parquet file/folder, or a jsonl file (with --image_root).",
        default="synthetic",
    )
    split: str = _help("Split of --dataset to read.", default="train")
    val_fraction: float = _help("Fraction held out for validation (deterministic, seeded).", default=0.1)
    num_examples: int | None = _help("Use only this many examples (synthetic: how many to draw).", default=None)
    image_column: str | None = _help("Column holding the image(s), when not the source's default.", default=None)
    question_column: str | None = _help("Column holding the question.", default=None)
    answer_column: str | None = _help("Column holding the gold answer.", default=None)
    thinking_column: str | None = _help("Column holding the reasoning trace (SFT).", default=None)
    image_root: str | None = _help("Folder that relative image paths in a jsonl file are under.", default=None)
    question_kinds: str = _help(
        "Synthetic data: comma-separated question kinds (total, by_color, by_shape, complex).", default="total"
    )
    count_min: int = _help("Synthetic data: fewest objects in a scene.", default=1)
    count_max: int = _help("Synthetic data: most objects in a scene.", default=10)
    image_size: int = _help("Synthetic data: side of the square scene in pixels.", default=112)
    synthetic_trace: str = _help(
        "Synthetic data: how a total question's reasoning trace counts: by_shape (per-shape counts and "
        "their sum) | count_aloud (one number per object) | none (the answer alone).",
        default="by_shape",
    )
    synthetic_layout: str = _help(
        "Synthetic data: scatter (objects anywhere, CLEVR's way) | grid (one object per cell of a 4 x 4 "
        "grid, each inside one image token of a 112 px scene).",
        default="scatter",
    )
    demonstrator_misses: str | None = _help(
        "Synthetic data: label the training scenes as a demonstrator blind to this colour would (e.g. "
        "gray): answers and traces leave those objects out (held-out parts keep the true answers). For "
        "imperfect SFT demonstrations; total questions only.",
        default=None,
    )
    max_prompt_length: int | None = _help(
        "Longest prompt in tokens (image tokens included). Longer prompts are never cut through "
        "their image tokens: they are skipped and counted, or rejected (see --long_prompts).",
        default=None,
    )
    long_prompts: str = _help("What to do with prompts over --max_prompt_length: skip | error.", default="skip")
    system_prompt: str | None = _help("System prompt; default: the R1 prompt of the blog post and the TRL recipe. '' for none.", default=None)

    @property
    def system_prompt_text(self) -> str | None:
        """The system prompt to use: the R1 prompt of the blog post and the TRL recipe by default, none when given ''."""
        if self.system_prompt is None:
            return SYSTEM_PROMPT
        return self.system_prompt or None

    def __post_init__(self):
        _reject_non_finite(self)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.count_min < 1 or self.count_max < self.count_min:  # a scene holds at least one object (data/synthetic.py)
            raise ConfigError(
                f"--count_min {self.count_min} / --count_max {self.count_max}: need 1 <= --count_min <= --count_max "
                "(a synthetic scene holds at least one object)"
            )
        if self.long_prompts not in ("skip", "error"):
            raise ConfigError(f"--long_prompts {self.long_prompts!r}: use skip or error")
        if self.synthetic_layout not in LAYOUTS:
            raise ConfigError(f"--synthetic_layout {self.synthetic_layout!r}: use one of {', '.join(LAYOUTS)}")
        if self.synthetic_layout == "grid" and self.count_max > GRID_CELLS**2:
            raise ConfigError(
                f"--count_max {self.count_max}: the grid layout holds at most {GRID_CELLS**2} objects "
                f"({GRID_CELLS} x {GRID_CELLS} cells)"
            )
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ConfigError("--max_prompt_length must be >= 1 (or leave it unset)")
        if self.num_examples is not None and self.num_examples < 1:
            raise ConfigError(f"--num_examples {self.num_examples}: must be >= 1 (or leave it unset for all)")
        if self.dataset in SYNTHETIC and self.split != "train":  # it was ignored
            raise ConfigError(
                f"--split {self.split!r}: the built-in synthetic data has no splits to pick (train.py trains on its "
                "train stream; eval.py --eval_part validation / test scores the held-out ones); drop --split"
            )
        kinds = [kind.strip() for kind in self.question_kinds.split(",") if kind.strip()]
        if not kinds or any(kind not in QUESTION_KINDS for kind in kinds):
            raise ConfigError(f"--question_kinds {self.question_kinds!r}: give a comma list of {', '.join(QUESTION_KINDS)}")
        if self.synthetic_trace not in TRACES:
            raise ConfigError(f"--synthetic_trace {self.synthetic_trace!r}: use one of {', '.join(TRACES)}")
        if self.demonstrator_misses is not None:
            palette = SHIFTED_PALETTE if self.dataset == "synthetic-shifted" else PALETTE
            if self.dataset not in SYNTHETIC:  # it would be ignored
                raise ConfigError(
                    f"--demonstrator_misses relabels the built-in synthetic scenes, not --dataset {self.dataset}; drop it"
                )
            if self.demonstrator_misses not in palette:
                raise ConfigError(
                    f"--demonstrator_misses {self.demonstrator_misses!r} is not a colour of {self.dataset}'s scenes; "
                    f"use one of {', '.join(palette)}"
                )
            if kinds != ["total"]:
                raise ConfigError(
                    f"--demonstrator_misses works with --question_kinds total only, got {self.question_kinds!r}"
                )
        if self.image_size < 28:  # one 28 x 28 block is one merged image token of Qwen2.5-VL
            raise ConfigError(f"--image_size {self.image_size}: synthetic scenes need at least 28 pixels a side")


@dataclass
class TrainArguments:
    stage: str = _help("sft | grpo.", default="grpo")
    output_dir: str = _help("Where checkpoints, metrics.jsonl and samples.log go.", default="runs/grpo")
    max_steps: int = _help("Optimizer steps to run.", default=100)
    learning_rate: float = _help("Peak learning rate of AdamW.", default=1e-5)
    lr_scheduler: str = _help("constant | cosine (both after linear warm-up).", default="constant")
    warmup_steps: int = _help("Linear warm-up steps.", default=0)
    weight_decay: float = _help("AdamW weight decay.", default=0.1)
    adam_beta1: float = _help("AdamW beta1.", default=0.9)
    adam_beta2: float = _help("AdamW beta2.", default=0.99)
    adam_epsilon: float = _help("AdamW epsilon, added to sqrt(v) in the update's denominator.", default=1e-8)
    max_grad_norm: float = _help("Clip the global gradient norm to this (0 disables).", default=1.0)
    seed: int = _help("Seed for model init (tiny preset), data order and sampling.", default=0)
    device: str = _help("auto | cpu | cuda. Under torchrun each rank takes cuda:LOCAL_RANK.", default="auto")
    logging_steps: int = _help(
        "Print a metrics line on stdout (rank 0) every N steps (0: never; metrics.jsonl gets every step).", default=10
    )
    report_to: str = _help(
        "Also send the metrics, samples and config to: none | tensorboard (OUTPUT_DIR/tensorboard) | "
        "wandb (OUTPUT_DIR/wandb; WANDB_MODE=offline works), or a comma list. metrics.jsonl is always written.",
        default="none",
    )
    save_steps: int = _help("Save a checkpoint every N steps (and always at the end). 0: only at the end.", default=50)
    save_total_limit: int = _help("Checkpoints to keep; older ones are deleted after a new one is complete.", default=2)
    resume: bool = _help("Continue the run in --output_dir from its latest checkpoint.", default=False)
    overwrite_output_dir: bool = _help("Delete another run's checkpoints in --output_dir and start over.", default=False)
    max_nonfinite_steps: int = _help("Stop after this many consecutive steps with a non-finite loss/grad.", default=3)
    progress_bar: bool = _help("Show a tqdm progress bar on rank 0.", default=True)
    skip_preflight: bool = _help(
        "Skip the pre-flight step: before step 1, one forward and backward at the longest prompt (SFT: "
        "the longest example) and the configured micro-batch, so a run that cannot fit fails at once.",
        default=False,
    )
    fsdp: bool = _help(
        "Shard weights, gradients and Adam moments over the ranks with FSDP2 (torch fully_shard) "
        "instead of keeping a full replica per rank: for models that do not fit one device. Same "
        "math as without it; checkpoints stay plain Qwen2.5-VL folders. Not with --freeze_policy lora.",
        default=False,
    )

    def __post_init__(self):
        _reject_non_finite(self)
        if self.stage not in STAGES:
            raise ConfigError(f"--stage {self.stage!r} is not one of {STAGES}")
        if self.max_steps < 1:
            raise ConfigError("--max_steps must be >= 1")
        if self.learning_rate <= 0:
            raise ConfigError("--learning_rate must be > 0")
        if self.lr_scheduler not in SCHEDULES:
            raise ConfigError(f"--lr_scheduler {self.lr_scheduler!r} is not one of {SCHEDULES}")
        if self.warmup_steps < 0 or self.save_steps < 0 or self.save_total_limit < 1:
            raise ConfigError("--warmup_steps and --save_steps must be >= 0, --save_total_limit >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device {self.device!r}: use auto, cpu or cuda")
        if self.resume and self.overwrite_output_dir:
            raise ConfigError(
                "pass only one of --resume and --overwrite_output_dir: --resume continues the run in "
                "--output_dir, --overwrite_output_dir deletes its checkpoints and starts over"
            )
        if self.max_nonfinite_steps < 1:
            raise ConfigError("--max_nonfinite_steps must be >= 1")
        if self.max_grad_norm < 0:
            raise ConfigError(f"--max_grad_norm {self.max_grad_norm}: must be >= 0 (0 turns clipping off)")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight_decay {self.weight_decay}: must be >= 0")
        if not (0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0):
            raise ConfigError(f"--adam_beta1 {self.adam_beta1} / --adam_beta2 {self.adam_beta2}: each must be in [0, 1)")
        if self.adam_epsilon <= 0:
            raise ConfigError(f"--adam_epsilon {self.adam_epsilon}: must be > 0 (it keeps the update finite where v = 0)")
        if self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"--warmup_steps {self.warmup_steps} is longer than --max_steps {self.max_steps}: the learning "
                "rate would never reach its peak; lower --warmup_steps"
            )
        if self.logging_steps < 0:
            raise ConfigError(f"--logging_steps {self.logging_steps}: must be >= 0 (0 prints no metrics line)")
        for backend in self.report_to_backends:
            if importlib.util.find_spec(backend) is None:
                raise ConfigError(
                    f"--report_to {backend} needs the {backend} package, which is not installed: "
                    f"pip install -e '.[logging]' (or pip install {backend}), or drop it from --report_to"
                )

    @property
    def report_to_backends(self) -> list[str]:
        """The --report_to names other than none; raises ConfigError on one it does not know."""
        names = [name.strip() for name in self.report_to.split(",") if name.strip()]
        unknown = [name for name in names if name not in ("none", *REPORT_TO)]
        if unknown or not names or ("none" in names and len(names) > 1):
            raise ConfigError(
                f"--report_to {self.report_to!r}: use none, or a comma list of {', '.join(REPORT_TO)}"
            )
        return [name for name in names if name != "none"]


@dataclass
class GRPOArguments:
    per_device_prompts: int = _help("B: prompts per rank in one generation batch.", default=4)
    num_generations: int = _help("G: completions sampled per prompt (the group). At least 2.", default=8)
    steps_per_generation: int = _help(
        "Optimizer steps per inner epoch over one generation batch (its B*G completions are split "
        "into this many equal mini-batches).",
        default=1,
    )
    micro_batch_size: int = _help("Completions per forward/backward (gradient accumulation unit).", default=8)
    num_iterations: int = _help("Inner epochs (PPO-style) over each generation batch. mu in the GRPO paper.", default=1)
    max_completion_length: int = _help("Most tokens sampled per completion.", default=64)
    temperature: float = _help("Sampling temperature tau; the loss uses logits / tau too. 0 = greedy.", default=1.0)
    top_p: float = _help("Nucleus sampling threshold (1.0 = off).", default=1.0)
    top_k: int = _help("Top-k sampling (0 = off).", default=0)
    beta: float = _help("Weight of the k3 KL to the frozen reference (0: no reference model is built).", default=0.04)
    epsilon: float = _help("PPO clip range: ratio is clipped to [1 - epsilon, 1 + epsilon_high].", default=0.2)
    epsilon_high: float | None = _help("Upper clip (DAPO clip-higher); default: --epsilon.", default=None)
    loss_aggregation: str | None = _help(
        "sequence (GRPO: mean over each completion's tokens, then over completions; the default) | token (DAPO: "
        "over all tokens of the step) | constant (Dr. GRPO: sum / (completions * max_completion_length)) | "
        "sequence_sum (LUSPO: sum over each completion's tokens, mean over completions) | micro_batch_token "
        "(TRL's bnpo: each micro-batch's token mean, averaged over the step's micro-batches and ranks).",
        default=None,
    )
    loss_type: str | None = _help(
        "A TRL GRPOConfig.loss_type name, setting --loss_aggregation, --importance_sampling_level and "
        "--objective as TRL does: grpo (sequence, token, clip) | dapo (token, token, clip) | dr_grpo "
        "(constant, token, clip) | gspo (sequence, sequence, clip: TRL's grpo with "
        "importance_sampling_level=sequence) | cispo (token, token, cispo) | bnpo (micro_batch_token, token, "
        "clip) | sapo (sequence, token, sapo) | luspo (sequence_sum, sequence, clip) | vespo (token, token, "
        "vespo). Default: set those flags yourself.",
        default=None,
    )
    importance_sampling_level: str | None = _help(
        "token (PPO/GRPO: one ratio per token; the default) | sequence (GSPO, arXiv 2507.18071: one "
        "length-normalised ratio exp(mean_t log(pi/pi_old)) per completion, clipped per completion; "
        "GSPO clips at --epsilon 3e-4 --epsilon_high 4e-4).",
        default=None,
    )
    objective: str | None = _help(
        "clip (PPO's clipped surrogate; the default) | cispo (MiniMax-M1, arXiv 2506.13585: the ratio "
        "capped at 1 + --epsilon_high and detached, times A * log pi, so clipped tokens keep a "
        "gradient; TRL's epsilon_high under cispo is the cap itself, i.e. ours + 1) | sapo (SAPO's soft "
        "gate, --sapo_temperature_pos/neg) | vespo (VESPO's Gamma weight of the completion's ratio, "
        "--vespo_k_pos/neg, --vespo_lambda_pos/neg).",
        default=None,
    )
    kl_estimator: str = _help(
        "The KL penalty's per-token estimator (x = log pi_ref - log pi): k3 (exp(x) - x - 1; unbiased "
        "value, but its gradient is that of KL(pi_ref || pi)) | k1 (-x; zero expected gradient) | k2 "
        "(x^2 / 2; biased value, unbiased gradient) | k3_plus (k3 value, k2 gradient, as verl's k3+) "
        "| k3_ratio (k3 times pi/pi_old, TRL's use_bias_correction_kl; unbiased gradient).",
        default="k3",
    )
    advantage_scale: str = _help("group (z-score) | batch (divide by the batch std) | none (Dr. GRPO).", default="group")
    mask_truncated_completions: bool = _help("Leave completions that hit max_completion_length out of the loss.", default=False)
    reward_functions: str = _help(
        "Comma-separated reward functions: built-in names (format, count_accuracy, choice_accuracy, "
        "math_accuracy) or module:function.",
        default="format,count_accuracy",
    )
    reward_weights: str | None = _help("Comma-separated weights, one per reward function (default all 1).", default=None)
    sample_log_steps: int = _help("Write a sample (question, answer, completion, rewards) every N steps.", default=10)
    reuse_frozen_image_features: bool = _help(
        "When the vision tower is frozen, reuse the rollout's image features in every training, "
        "old-policy and reference forward of the step instead of re-encoding.",
        default=True,
    )
    old_logprobs_from_sampler: bool = _help(
        "With --num_iterations > 1, take the old-policy logprobs from the sampler (it records log "
        "pi_old of every token it draws) instead of a separate no-grad forward. The same numbers in "
        "exact arithmetic; in bfloat16 the decode and training kernels round differently, so the "
        "first epoch's ratio is then only close to 1.",
        default=False,
    )
    sampler_correction: str = _help(
        "Correct the policy term for the sampler/trainer mismatch with the weight pi_old / pi_sampler "
        "(pi_sampler: the rollout's recorded logprobs) capped at --sampler_correction_cap: none | "
        "token_truncate (TIS: min(ratio, C) per token) | token_mask (MIS: tokens with ratio > C dropped) "
        "| sequence_truncate | sequence_mask (MIS: completions whose product of ratios > C dropped). "
        "TRL's --vllm_importance_sampling_mode (an alias here; TRL turns it on by default for vLLM, "
        "whose kernels differ from the trainer's: this project's sampler is the policy itself, so none). "
        "The gap itself is logged every step either way.",
        default="none", aliases=["--vllm_importance_sampling_mode"],
    )
    sampler_correction_cap: float = _help(
        "C, the cap of --sampler_correction's weight (TRL's --vllm_importance_sampling_clip_max, an alias).",
        default=3.0, aliases=["--vllm_importance_sampling_clip_max"],
    )
    sampler_correction_min: float | None = _help(
        "C_min, a lower bound of --sampler_correction's weight (TRL's vllm_importance_sampling_clip_min): "
        "the truncate modes raise weights below it to C_min, the mask modes drop them. In [0, "
        "--sampler_correction_cap). Default: none. Alias: --vllm_importance_sampling_clip_min.",
        default=None, aliases=["--vllm_importance_sampling_clip_min"],
    )
    delta: float | None = _help(
        "INTELLECT-2's two-sided clip (arXiv 2505.07291; TRL's delta): bound the unclipped ratio above by "
        "delta, so a token with A < 0 whose ratio grew past delta adds a constant (no gradient). > 1; "
        "use >= 1 + --epsilon_high (INTELLECT-2: 4). verl/OpenRLHF's dual-clip clip_ratio_c is the same "
        "bound (docs/grpo.md). Default: off (PPO's one-sided clip).",
        default=None,
    )
    sapo_temperature_pos: float = _help(
        "tau of --loss_type sapo's soft gate (4 / tau) sigmoid(tau (ratio - 1)) for tokens with A > 0 (SAPO, "
        "arXiv 2511.20347; TRL's name and default). Larger: the gate closes faster off-policy. > 0.",
        default=1.0,
    )
    sapo_temperature_neg: float = _help(
        "tau of --loss_type sapo's soft gate for tokens with A <= 0 (TRL's default 1.05: negative "
        "advantages gated a little harder). > 0.",
        default=1.05,
    )
    vespo_k_pos: float = _help(
        "k of --loss_type vespo's weight phi(w) = e^lambda w^k e^(-lambda w) (w: the completion's ratio "
        "prod_t pi/pi_old; VESPO, arXiv 2602.10693) for A >= 0: how fast w < 1 is down-weighted. >= 0.",
        default=2.0,
    )
    vespo_lambda_pos: float = _help("lambda of --loss_type vespo's weight for A >= 0: how fast w > 1 is down-weighted. > 0.", default=3.0)
    vespo_k_neg: float = _help("k of --loss_type vespo's weight for A < 0. >= 0.", default=3.0)
    vespo_lambda_neg: float = _help("lambda of --loss_type vespo's weight for A < 0. > 0.", default=2.0)
    off_policy_mask_threshold: float | None = _help(
        "DeepSeek-V3.2's off-policy sequence mask (arXiv 2512.02556, eq. 9; TRL's name): leave out of the "
        "policy term each completion with A < 0 whose mean log(pi_sampler / pi_theta) over its tokens "
        "exceeds this threshold (>= 0; TRL suggests 0.5). Default: off.",
        default=None,
    )
    decode: str = _help(
        "How the sampler runs its decode steps: auto (cuda_graph on CUDA without --fsdp, dynamic elsewhere) | dynamic "
        "(HF's growing KV cache, plain PyTorch) | static (preallocated buffers) | cuda_graph (static, "
        "each step replayed from one CUDA graph; needs CUDA).",
        default="auto",
    )
    shared_prompt_forward: bool = _help(
        "Run each prompt once per training, old-policy and reference forward and copy its KV cache to "
        "its G completions, instead of running [prompt ; completion] G times (same logprobs and "
        "gradients; off automatically under --gradient_checkpointing, which disables the KV cache).",
        default=True,
    )
    dynamic_sampling: bool = _help(
        "DAPO's dynamic sampling (arXiv 2503.14476 sec. 3.2): drop groups whose rewards all agree "
        "(zero advantage) and sample more prompts until each rank holds --per_device_prompts "
        "groups with a reward spread, for at most --max_generation_rounds rounds (a batch still "
        "short is filled with dropped groups, counted in dynamic/groups_filled).",
        default=False,
    )
    max_generation_rounds: int = _help(
        "With --dynamic_sampling: most rounds of --per_device_prompts prompts sampled for one "
        "generation batch (every rank runs the same number).",
        default=3,
    )
    overlong_buffer_length: int | None = _help(
        "L of the `overlong` reward (DAPO sec. 3.4): the penalty falls from 0 to -1 over the last L "
        "tokens before --max_completion_length. Default: a fifth of it (DAPO: 4096 of 20480).",
        default=None,
    )
    top_entropy_quantile: float = _help(
        "Train the policy-gradient term only on this top fraction of each optimizer step's completion "
        "tokens by the policy's entropy (arXiv 2506.01939; 0.2 there). 1.0 = every token. The KL "
        "term keeps every token. Costs one extra no-grad forward per optimizer step when < 1.",
        default=1.0,
    )
    sync_ref_model: bool = _help(
        "TR-DPO (arXiv 2404.09656): every --ref_model_sync_steps optimizer steps move the KL reference "
        "toward the policy, ref <- alpha * policy + (1 - alpha) * ref. Needs --beta > 0. The moved "
        "reference is kept in each checkpoint (its trained weights: up to a second copy of the model).",
        default=False,
    )
    ref_model_mixup_alpha: float = _help(
        "alpha of --sync_ref_model, in (0, 1]: the fraction of the way the reference moves (1: it "
        "becomes the policy).",
        default=0.6,
    )
    ref_model_sync_steps: int = _help("tau of --sync_ref_model: optimizer steps between two reference updates.", default=512)
    entropy_coef: float = _help(
        "c: subtract c * (mean entropy of the policy over the trained completion tokens) from the loss, "
        "the same for every --loss_type (an entropy bonus for exploration when > 0). 0 = off. With "
        "--use_adaptive_entropy the starting value of the adapted coefficient.",
        default=0.0,
    )
    use_adaptive_entropy: bool = _help(
        "Skywork-OR1 (arXiv 2505.22312): after each optimizer step raise the entropy coefficient by "
        "--entropy_coef_delta while the step's mean entropy is <= --entropy_target, lower it otherwise "
        "(within [--entropy_coef_min, --entropy_coef_max]); the bonus applies only while the last "
        "step's entropy was <= the target (so not in step 1).",
        default=False,
    )
    entropy_target: float = _help(
        "Target mean per-token entropy (nats) of --use_adaptive_entropy. Language models typically sit "
        "at 1-10 nats, so the default 0.2 acts only on a near-collapse; set it near the entropy of the "
        "first steps (logged as entropy).",
        default=0.2,
    )
    entropy_coef_min: float = _help("Lowest entropy coefficient --use_adaptive_entropy may reach.", default=0.0)
    entropy_coef_max: float = _help("Highest entropy coefficient --use_adaptive_entropy may reach.", default=1.0)
    entropy_coef_delta: float = _help("Step of the entropy coefficient per optimizer step (--use_adaptive_entropy).", default=0.005)

    def __post_init__(self):
        _reject_non_finite(self)
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.overlong_buffer_length is None:
            self.overlong_buffer_length = max(1, self.max_completion_length // 5)
        if self.num_generations < 2:
            raise ConfigError(
                f"--num_generations {self.num_generations}: GRPO compares completions within a group, "
                "so it needs at least 2 (the blog post and the TRL recipe use 2-8)"
            )
        for name in ("per_device_prompts", "steps_per_generation", "micro_batch_size", "num_iterations", "max_completion_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.decode not in ("auto", *DECODE_MODES):
            raise ConfigError(f"--decode {self.decode!r} is not one of {('auto', *DECODE_MODES)}")
        self._resolve_loss_type()
        # The loss's options, built and checked once, here: LossOptions holds the checks (the loss
        # never re-checks them); its errors name the flags.
        try:
            self.loss_options = LossOptions(
                epsilon_low=self.epsilon, epsilon_high=self.epsilon_high, beta=self.beta,
                aggregation=self.loss_aggregation, importance_sampling_level=self.importance_sampling_level,
                objective=self.objective, kl_estimator=self.kl_estimator, sampler_correction=self.sampler_correction,
                sampler_correction_cap=self.sampler_correction_cap, sampler_correction_min=self.sampler_correction_min,
                delta=self.delta, off_policy_mask_threshold=self.off_policy_mask_threshold,
                sapo_temperature_pos=self.sapo_temperature_pos, sapo_temperature_neg=self.sapo_temperature_neg,
                vespo_k_pos=self.vespo_k_pos, vespo_lambda_pos=self.vespo_lambda_pos, vespo_k_neg=self.vespo_k_neg,
                vespo_lambda_neg=self.vespo_lambda_neg,
            )  # fmt: skip
        except LossOptionError as error:
            raise ConfigError(error.naming(lambda name: "--" + LOSS_OPTION_FLAGS.get(name, name))) from None
        # Values derived from the flags, once, here (the step reads them; nothing re-derives them).
        self.reward_weight_values = self._parse_reward_weights()  # [F] or None
        # Whether the loss carries the entropy bonus: a coefficient, or adaptive control (which may
        # bring a coefficient decremented to 0 back).
        self.entropy_bonus_enabled = self.entropy_coef != 0.0 or self.use_adaptive_entropy
        if self.sampler_correction != "none" and self.old_logprobs_from_sampler:
            raise ConfigError(
                f"--sampler_correction {self.sampler_correction} with --old_logprobs_from_sampler: pi_old is then "
                "the sampler's own logprobs, so the weight pi_old / pi_sampler is exactly 1; drop one of them"
            )
        if self.advantage_scale not in ADVANTAGE_SCALES:
            raise ConfigError(f"--advantage_scale {self.advantage_scale!r} is not one of {ADVANTAGE_SCALES}")
        if self.temperature < 0:
            raise ConfigError("--temperature must be >= 0 (0 = greedy)")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ConfigError(
                f"--temperature {self.temperature}: below {MIN_TEMPERATURE} logits / temperature can overflow to "
                f"inf (and sampling is greedy in all but name); use 0 for greedy decoding, or >= {MIN_TEMPERATURE}"
            )
        if not 0.0 < self.top_p <= 1.0 or self.top_k < 0:
            raise ConfigError("--top_p must be in (0, 1] and --top_k >= 0")
        if self.sample_log_steps < 0:
            raise ConfigError(f"--sample_log_steps {self.sample_log_steps}: must be >= 0 (0 writes no samples.log)")
        if self.max_generation_rounds < 1:
            raise ConfigError(f"--max_generation_rounds {self.max_generation_rounds}: must be >= 1 (1 = no extra rounds)")
        if not 1 <= self.overlong_buffer_length <= self.max_completion_length:
            raise ConfigError(
                f"--overlong_buffer_length {self.overlong_buffer_length}: must be in [1, --max_completion_length "
                f"{self.max_completion_length}] (the penalty zone is the last L tokens before the limit)"
            )
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ConfigError(
                f"--top_entropy_quantile {self.top_entropy_quantile}: must be in [0, 1] (1.0 trains on every "
                "token; 0.2 keeps the top 20% by entropy)"
            )
        self._check_reference_sync_and_entropy_bonus()
        generation_batch = self.per_device_prompts * self.num_generations
        if generation_batch % self.steps_per_generation:
            raise ConfigError(
                f"the generation batch (--per_device_prompts {self.per_device_prompts} x --num_generations "
                f"{self.num_generations} = {generation_batch}) does not split into --steps_per_generation "
                f"{self.steps_per_generation} equal mini-batches; change one of them"
            )
        mini_batch = generation_batch // self.steps_per_generation
        if mini_batch % self.micro_batch_size:
            raise ConfigError(
                f"each optimizer step takes {mini_batch} completions, which --micro_batch_size "
                f"{self.micro_batch_size} does not divide; pick a divisor of {mini_batch}"
            )

    def _check_reference_sync_and_entropy_bonus(self) -> None:
        """--sync_ref_model and the entropy bonus's flags (grpo/reference_sync.py, grpo/entropy_bonus.py)."""
        if self.sync_ref_model and self.beta == 0:
            raise ConfigError(
                "--sync_ref_model moves the KL reference, but --beta 0 builds no reference; set --beta > 0 "
                "or drop --sync_ref_model"
            )
        if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
            raise ConfigError(
                f"--ref_model_mixup_alpha {self.ref_model_mixup_alpha}: must be in (0, 1] (0 would never move "
                "the reference; 1 copies the policy)"
            )
        if self.ref_model_sync_steps < 1:
            raise ConfigError(f"--ref_model_sync_steps {self.ref_model_sync_steps}: must be >= 1 (optimizer steps)")
        if self.entropy_target < 0:
            raise ConfigError(f"--entropy_target {self.entropy_target}: an entropy in nats is >= 0")
        if self.entropy_coef_delta < 0:
            raise ConfigError(f"--entropy_coef_delta {self.entropy_coef_delta}: must be >= 0")
        if self.entropy_coef_min > self.entropy_coef_max:
            raise ConfigError(
                f"--entropy_coef_min {self.entropy_coef_min} is above --entropy_coef_max {self.entropy_coef_max}; "
                "swap them"
            )
        if self.use_adaptive_entropy and not self.entropy_coef_min <= self.entropy_coef <= self.entropy_coef_max:
            raise ConfigError(
                f"--entropy_coef {self.entropy_coef} is the adaptive coefficient's start, but lies outside "
                f"[--entropy_coef_min {self.entropy_coef_min}, --entropy_coef_max {self.entropy_coef_max}]; "
                "pick a start inside the range"
            )

    def _resolve_loss_type(self) -> None:
        """--loss_type fills --loss_aggregation, --importance_sampling_level and --objective; a value
        given for one of them must agree. Unset ones fall back to GRPO (sequence, token, clip)."""
        if self.loss_type is not None:
            if self.loss_type not in LOSS_TYPES:
                raise ConfigError(
                    f"--loss_type {self.loss_type!r} is not one of {tuple(LOSS_TYPES)}: that loss is not implemented here"
                )
            for option, value in LOSS_TYPES[self.loss_type].items():
                name = LOSS_OPTION_FLAGS.get(option, option)
                given = getattr(self, name)
                if given is not None and given != value:
                    raise ConfigError(
                        f"--loss_type {self.loss_type} means --{name} {value}, but --{name} {given} was given; "
                        "drop one of them"
                    )
                setattr(self, name, value)
        for name, default in (("loss_aggregation", "sequence"), ("importance_sampling_level", "token"), ("objective", "clip")):
            if getattr(self, name) is None:
                setattr(self, name, default)

    @property
    def reward_function_names(self) -> list[str]:
        return [name.strip() for name in self.reward_functions.split(",") if name.strip()]

    def _parse_reward_weights(self) -> list[float] | None:
        """--reward_weights as numbers, one per reward function (None: every weight 1)."""
        if self.reward_weights is not None and not self.reward_weights.strip():
            raise ConfigError("--reward_weights is empty; give one number per reward function, or drop it (all 1)")
        try:
            return parse_reward_weights(self.reward_weights, len(self.reward_function_names))
        except ValueError as error:
            raise ConfigError(str(error)) from None


@dataclass
class SFTArguments:
    per_device_batch_size: int = _help("Examples per rank per micro-batch.", default=8)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    eval_steps: int = _help("Validation loss every N steps (0: only at the end).", default=100)
    max_eval_examples: int = _help("Validation examples used for the validation loss.", default=256)
    eval_accuracy_reward: str = _help(
        "Also measure greedy validation accuracy at every evaluation, scored by this reward function "
        "(e.g. count_accuracy; '' = off). Logged as val_accuracy.",
        default="",
    )
    early_stopping_patience: int = _help(
        "Stop when val_accuracy has not improved by more than --early_stopping_min_delta for this many "
        "evaluations in a row (0 = never stop early). Needs --eval_accuracy_reward and --eval_steps.",
        default=0,
    )
    early_stopping_min_delta: float = _help("Smallest rise of val_accuracy that counts as an improvement.", default=0.0)

    def __post_init__(self):
        _reject_non_finite(self)
        if self.per_device_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("--per_device_batch_size and --gradient_accumulation_steps must be >= 1")
        if self.eval_steps < 0 or self.max_eval_examples < 1:
            raise ConfigError("--eval_steps must be >= 0 and --max_eval_examples >= 1")
        if self.early_stopping_patience < 0 or not 0.0 <= self.early_stopping_min_delta < 1.0:
            raise ConfigError("--early_stopping_patience must be >= 0 and --early_stopping_min_delta in [0, 1)")
        if self.early_stopping_patience and not (self.eval_accuracy_reward and self.eval_steps):
            raise ConfigError(
                "--early_stopping_patience watches val_accuracy: also pass --eval_accuracy_reward "
                "(e.g. count_accuracy) and --eval_steps N > 0"
            )


ALL_ARGUMENTS = (ModelArguments, DataArguments, TrainArguments, GRPOArguments, SFTArguments)

# `python train.py --help` in tiers, each flag in exactly one (tests/test_config.py holds them to the
# dataclasses): first the hyper-parameters a minimal GRPO has (grpo/minimal.py), then the options
# that change the objective, then how fast and on what it runs, then the run around it.
HELP_TIERS = (
    ("GRPO: the minimal loop's hyper-parameters", "The flags of grpo/minimal.py: what Algorithm 1 of the paper needs.", (
        "per_device_prompts", "num_generations", "max_completion_length", "temperature", "reward_functions",
        "reward_weights", "num_iterations", "epsilon", "beta", "learning_rate", "max_steps",
    )),
    ("GRPO objective and optimizer options", "Variants of the objective (DAPO, Dr. GRPO, GSPO, CISPO, ...), sampling and the optimizer; docs/grpo.md.", (
        "steps_per_generation", "top_p", "top_k", "epsilon_high", "loss_aggregation", "loss_type",
        "importance_sampling_level", "objective", "kl_estimator", "advantage_scale", "mask_truncated_completions",
        "old_logprobs_from_sampler", "sampler_correction", "sampler_correction_cap", "sampler_correction_min", "delta",
        "off_policy_mask_threshold", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
        "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "dynamic_sampling",
        "max_generation_rounds", "overlong_buffer_length", "top_entropy_quantile", "lr_scheduler", "warmup_steps",
        "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "entropy_coef",
        "use_adaptive_entropy", "entropy_target", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta",
        "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps",
    )),
    ("engine and speed", "Same objective, other memory and speed: precision, batching, the sampler's decode loop, ranks.", (
        "dtype", "attn_implementation", "gradient_checkpointing", "micro_batch_size", "decode", "shared_prompt_forward",
        "reuse_frozen_image_features", "device", "fsdp", "skip_preflight",
    )),
    ("run, model and data", "Which model trains (and which of its weights), on which data, and where the run writes.", (
        "config", "stage", "model", "init_from", "freeze_policy", "num_trainable_layers", "lora_r", "lora_alpha",
        "lora_dropout", "lora_targets", "dataset", "split", "val_fraction", "num_examples", "image_column",
        "question_column", "answer_column", "thinking_column", "image_root", "question_kinds", "count_min",
        "count_max", "image_size", "synthetic_trace", "synthetic_layout", "demonstrator_misses", "max_pixels",
        "min_pixels", "max_prompt_length", "long_prompts", "system_prompt", "output_dir", "seed", "logging_steps",
        "sample_log_steps", "report_to", "save_steps", "save_total_limit", "resume", "overwrite_output_dir",
        "max_nonfinite_steps", "progress_bar",
    )),
    ("the SFT stage (--stage sft)", "The supervised warm-up's batch, evaluation and early stopping.", (
        "per_device_batch_size", "gradient_accumulation_steps", "eval_steps", "max_eval_examples",
        "eval_accuracy_reward", "early_stopping_patience", "early_stopping_min_delta",
    )),
)  # fmt: skip
_TIER_OF_FLAG = {name: title for title, _, names in HELP_TIERS for name in names}


class _TieredParser(HfArgumentParser):
    """HfArgumentParser whose --help lists the flags by HELP_TIERS (argparse argument groups).

    HfArgumentParser adds each dataclass field through `add_argument`; this routes the flag (and a
    boolean's `--no_` twin, which shares its dest) into its tier's group. Parsing is unchanged: the
    groups only order the help.
    """

    def add_argument(self, *names, **kwargs):
        tier = _TIER_OF_FLAG.get(kwargs.get("dest") or names[0].lstrip("-"))
        if tier is None:  # -h/--help (a flag without a tier fails tests/test_config.py)
            return super().add_argument(*names, **kwargs)
        if not hasattr(self, "_tiers"):  # the first flag: the groups, in tier order
            self._tiers = {title: self.add_argument_group(title, about) for title, about, _ in HELP_TIERS}
        return self._tiers[tier].add_argument(*names, **kwargs)


@dataclass
class Config:
    """All arguments of one run, grouped as the parser groups them."""

    model: ModelArguments
    data: DataArguments
    train: TrainArguments
    grpo: GRPOArguments
    sft: SFTArguments

    def to_dict(self) -> dict:
        return {group: asdict(getattr(self, group)) for group in ("model", "data", "train", "grpo", "sft")}


def _read_config_file(path: str) -> dict:
    if not path.strip():  # it was skipped: the run went on with the defaults
        raise ConfigError("--config is empty (an unset shell variable?); give the YAML or JSON file, or drop --config")
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--config {path}: cannot read it ({error})") from None
    if path.endswith((".yaml", ".yml")):
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"--config {path}: not valid YAML ({error})".replace("\n", " ")) from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--config {path}: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    # A file written by Config.to_dict() is grouped; flatten it.
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key in ("model", "data", "train", "grpo", "sft"):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _describe(value) -> str:
    kind = {list: "the list ", dict: "the mapping "}.get(type(value), "")
    return f"{kind}{value!r}"


def _type_name(annotation) -> str:
    """A field's type as text ("int", "float | None"): a string under `from __future__ import
    annotations`, a real type once HfArgumentParser has resolved the dataclass."""
    if isinstance(annotation, str):
        return annotation
    args = typing.get_args(annotation)
    names = [getattr(arg, "__name__", str(arg)) for arg in (args or (annotation,))]
    return " | ".join("None" if name == "NoneType" else name for name in names)


def _file_value(path: str, name: str, value, annotation: str):
    """A --config value checked against its field's type (argparse converts only CLI strings, so a
    file's `beta: [1, 2]` would otherwise reach the checks as a list, `per_device_prompts: 2.5` as a float)."""
    kind = annotation.split("|")[0].strip()  # "int | None" -> "int"
    if value is None:
        if "None" in annotation:
            return None
        raise ConfigError(f"--config {path}: {name}: expected a value, got null")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"--config {path}: {name}: expected true or false, got {_describe(value)}")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"--config {path}: {name}: expected an integer, got {_describe(value)}")
    if kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"--config {path}: {name}: expected a float, got {_describe(value)}")
    if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return str(value)  # e.g. `reward_weights: 1` for a single function
    raise ConfigError(f"--config {path}: {name}: expected a string, got {_describe(value)}")


def build_parser() -> HfArgumentParser:
    """The command line of train.py: every dataclass field a flag, --help in HELP_TIERS."""
    parser = _TieredParser(ALL_ARGUMENTS, usage="%(prog)s [--config FILE] [--FLAG VALUE ...]  (--help: the flags, by tier)")
    parser.add_argument("--config", default=None, help="YAML or JSON file of flag values; CLI flags override it.")
    for _, _, names in HELP_TIERS:  # within a tier, HELP_TIERS' order rather than the dataclasses'
        group = parser._tiers[_TIER_OF_FLAG[names[0]]]
        group._group_actions.sort(key=lambda action: names.index(action.dest))  # argparse keeps a group's flags here
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    """Parse CLI flags (and an optional --config YAML/JSON file that CLI flags override)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config is not None:
        values = _read_config_file(known.config)
        # HfArgumentParser resolves `int | None` to `int` in place: a None default marks the optional ones.
        annotations = {
            f.name: _type_name(f.type) + (" | None" if f.default is None else "") for cls in ALL_ARGUMENTS for f in fields(cls)
        }
        unknown = sorted(set(values) - set(annotations))
        if unknown:
            raise ConfigError(f"--config {known.config}: unknown keys {unknown}; see python train.py --help")
        values = {name: _file_value(known.config, name, value, annotations[name]) for name, value in values.items()}
        parser.set_defaults(**values)
    outputs = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    rest = outputs[-1]
    if rest:
        raise ConfigError(f"unknown arguments {rest}; see python train.py --help")
    # The parser appends a Namespace holding --config after the dataclasses; keep the dataclasses.
    groups = [group for group in outputs[:-1] if isinstance(group, ALL_ARGUMENTS)]
    config = Config(*groups)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Checks that span several argument groups."""
    if config.train.stage == "grpo" and not config.grpo.reward_function_names:
        raise ConfigError("--reward_functions is empty; GRPO needs at least one reward function")
    if config.train.fsdp and config.model.freeze_policy == "lora":
        raise ConfigError(
            "--fsdp with --freeze_policy lora is not supported (saving would have to merge adapters "
            "into sharded weights); use --fsdp with --freeze_policy full, language or projector_embeddings_first_layers, or LoRA without --fsdp"
        )
    if config.train.fsdp and config.grpo.decode == "cuda_graph":
        raise ConfigError(
            "--fsdp with --decode cuda_graph is not supported (FSDP gathers the sharded weights with "
            "collectives inside every forward, which the graph capture does not handle); use --decode "
            "auto, dynamic or static with --fsdp"
        )
