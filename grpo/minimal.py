"""GRPO in one file: the whole algorithm, top to bottom, on the Hugging Face Qwen2.5-VL classes.

    python train.py --stage sft --output_dir runs/sft-minimal --max_steps 100 --learning_rate 1e-3 \
        --warmup_steps 15 --per_device_batch_size 32 --num_examples 1000 --dataset synthetic \
        --question_kinds total --synthetic_layout grid --system_prompt ""    # ~45 s of CPU
    python -m grpo.minimal --init_from runs/sft-minimal                       # ~50 s of CPU, one thread

The second prints a line per step; its mean reward (format + count_accuracy, at most 2) went from
0.61 over steps 1-10 to 0.91 over steps 51-60 (format 0.55 -> 0.80, count accuracy 0.05 -> 0.10).

Read this file first; the production trainer (train.py -> grpo/grpo_loop.py) computes the same loss
and gradients at its default flags (tests/test_minimal.py). The untrained tiny model never earns a
reward (nothing to learn), hence the SFT run: its model writes the format and counts some scenes.

DeepSeekMath (arXiv 2402.03300), Algorithm 1 (iterative GRPO) and eq. 3, one step:

    1. sample B prompts q                                                 (synthetic counting scenes)
    2. sample G completions o_1..o_G ~ pi_old(. | q) per prompt           sample_completions
       and mask each completion through its first EOS                     completion_mask
    3. score each completion: r_i                                          grpo/rewards.py
    4. A_i = (r_i - mean(r)) / (std(r) + eps) within each group            group_advantages
    5. log pi_old (only when mu > 1) and log pi_ref (only when beta > 0)   completion_logprobs, no grad
    6. mu inner epochs of AdamW on -J (gradient norm clipped to 1)        grpo_loss
           J = 1/G sum_i 1/|o_i| sum_t [ min(ratio_it A_i, clip(ratio_it, 1 - eps, 1 + eps) A_i)
                                         - beta * D_KL,it ]
           ratio_it = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)
           D_KL,it  = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1       (k3, Schulman's estimator)

Where it departs from the paper, and why:
    1. The reference stays the starting checkpoint; the paper's outer loop refreshes it.
    2. mu = 1 runs no old-policy forward: old = logprobs.detach(), so the ratio is 1 in value and
       its gradient is grad log pi (grpo/loss.py explains the trick).
    3. The policy is softmax(logits / temperature), the distribution the completions were drawn from.
    4. Each prompt is prefilled as G rows and every forward runs [prompt ; completion] per row
       (simplest to read); the production engine runs each prompt once, its KV cache copied G ways.
    5. One process on the CPU, the whole generation batch in one forward: no micro-batches, no
       ranks, no checkpoints; every completion must be scored (no None rewards).

Plumbing, not GRPO, comes from the project: model and data builders (models/, data/), reward functions
(grpo/reward_functions.py), Qwen2.5-VL's image inputs and 3-D positions (grpo/engine/inputs.py).
Letters: B prompts, G per prompt, R = B*G rows, P prompt and T completion tokens, V vocabulary, D hidden size, N image tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from einops import rearrange, repeat

from data.collators import GRPOCollator
from data.synthetic import make_counting_dataset
from grpo.engine.hf_compat import (
    cache_kwarg_name,
    image_token_id_of,
    output_cache,
    spatial_merge_size_of,
)
from grpo.engine.inputs import (
    build_inputs_embeds,
    count_images_per_prompt,
    encode_images,
    image_inputs_for_rows,
    mrope_position_ids,
)
from grpo.rewards import compute_rewards, parse_reward_weights, resolve_reward_functions
from models.loading import check_model_type, load_policy, make_reference, resolve_dtype, special_token_ids


@dataclass
class Hyper:
    init_from: str = "runs/sft-minimal"  # a save_pretrained folder, a train.py output_dir, or "tiny"
    steps: int = 60
    B: int = 4  # prompts per step
    G: int = 8  # completions per prompt (the group)
    max_completion_length: int = 48
    temperature: float = 1.0  # > 0: the policy is softmax(logits / temperature)
    num_iterations: int = 1  # mu, inner epochs over each generation batch
    epsilon: float = 0.2  # clip range of the ratio
    beta: float = 0.04  # weight of the k3 KL to the reference
    std_eps: float = 1e-4  # added to the group std
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    reward_functions: str = "format,count_accuracy"  # names in grpo/rewards.py, or module:function
    reward_weights: str = ""  # comma-separated, one per function; "" = all 1
    num_prompts: int = 1000  # synthetic counting scenes to sample prompts from
    image_size: int = 112
    dtype: str = "float32"
    seed: int = 0


# --- 1-2. prompts in, G completions out: a hand-written KV-cache decode loop ---


def prompt_inputs(model, batch: dict, G: int):
    """Each of the B prompts as G rows (row r is prompt r // G): token embeddings with the image
    features scattered in [R, P, D], attention mask [R, P], 3-D rotary positions [3, R, P] and the
    position of the first completion token [R]. Left padding puts every prompt's end in column P-1."""
    image_token, merge = image_token_id_of(model), spatial_merge_size_of(model)
    images_per_prompt = count_images_per_prompt(
        batch["input_ids"], batch["image_grid_thw"], image_token_id=image_token, spatial_merge_size=merge
    )  # fmt: skip
    image_embeds = encode_images(model, batch["pixel_values"], batch["image_grid_thw"])  # [N, D] each image once
    num_rows = batch["input_ids"].shape[0] * G
    image_embeds, grid = image_inputs_for_rows(
        image_embeds, batch["image_grid_thw"], images_per_prompt, G, range(num_rows), merge
    )  # [N*G, D], [images*G, 3]: copied to the G rows of each prompt
    ids = repeat(batch["input_ids"], "b p -> (b g) p", g=G)  # [R, P]
    mask = repeat(batch["attention_mask"], "b p -> (b g) p", g=G)  # [R, P]
    positions, next_position = mrope_position_ids(
        ids, mask, grid, image_token_id=image_token, spatial_merge_size=merge
    )  # [3, R, P], [R]
    return build_inputs_embeds(model, ids, image_embeds), mask, positions, next_position


@torch.no_grad()
def sample_completions(model, batch: dict, hp: Hyper, eos: torch.Tensor, pad_id: int, generator) -> torch.Tensor:
    """[R, T] token ids: G completions per prompt drawn from softmax(logits / temperature); each row
    emits pad after its first EOS; T = the longest row. Prefill once, then one token per step."""
    model.eval()  # no dropout: the completions come from the policy itself
    embeds, mask, positions, next_position = prompt_inputs(model, batch, hp.G)  # [R, P, D], [R, P], ...
    num_rows = embeds.shape[0]
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    tokens, done = [], torch.zeros(num_rows, dtype=torch.bool)  # [R]
    for t in range(hp.max_completion_length):
        probs = torch.softmax(out.logits[:, -1] / hp.temperature, dim=-1)  # [R, V]
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # [R]
        token = torch.where(done, pad_id, token)  # [R] a finished row pads (masked out of the loss)
        tokens.append(token)
        done |= torch.isin(token, eos)
        if done.all() or t == hp.max_completion_length - 1:
            break
        mask = torch.cat([mask, mask.new_ones(num_rows, 1)], dim=1)  # [R, P+t+1]
        position = (next_position + t).view(1, num_rows, 1).expand(3, -1, -1)  # [3, R, 1] text: same on 3 axes
        out = model(
            inputs_embeds=build_inputs_embeds(model, token[:, None], None),  # [R, 1, D]
            attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1,
            **{cache_kwarg_name(model): output_cache(out)},  # the keys and values of every earlier token
        )  # fmt: skip
    return torch.stack(tokens, dim=1)  # [R, T]


def completion_mask(completion_ids: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """[R, T] 1.0 on each completion's tokens through its first EOS (emitting EOS is an action,
    "stop here", so it counts), 0.0 after it. Built from the EOS position, never from != pad: Qwen's
    pad id can be an EOS id. A row without EOS (cut at max_completion_length) counts every token."""
    is_eos = torch.isin(completion_ids, eos).long()  # [R, T]
    eos_before = is_eos.cumsum(dim=1) - is_eos  # [R, T] EOS tokens in [0, t)
    return (eos_before == 0).float()  # [R, T]


# --- 4. advantages: the z-score of each reward within its group ---


def group_advantages(rewards: torch.Tensor, G: int, eps: float) -> torch.Tensor:
    """[R] A_i = (r_i - mean(r)) / (std(r) + eps) over the G rewards of each prompt (unbiased std,
    as TRL). eps guards the division in a group whose rewards all agree: its A is then 0."""
    r = rearrange(rewards, "(b g) -> b g", g=G)  # [B, G] a prompt's G completions are adjacent rows
    A = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + eps)  # [B, G]
    return rearrange(A, "b g -> (b g)")  # [R]


# --- 5-6. log-probabilities and the loss ---


def completion_logprobs(model, batch: dict, completion_ids: torch.Tensor, hp: Hyper) -> torch.Tensor:
    """[R, T] log pi(o_t | q, o_<t) of every completion token, each row run as [prompt ; completion]."""
    embeds, mask, positions, next_position = prompt_inputs(model, batch, hp.G)  # [R, P, D], [R, P], ...
    T = completion_ids.shape[1]
    steps = torch.arange(T)  # [T] completion tokens are text: positions go on from the prompt's max + 1
    positions = torch.cat([positions, (next_position[:, None] + steps).expand(3, -1, -1)], dim=2)  # [3, R, P+T]
    embeds = torch.cat([embeds, build_inputs_embeds(model, completion_ids, None)], dim=1)  # [R, P+T, D]
    # The pad after a row's EOS may be attended to by later pads only (causal): the tokens that count never see it.
    mask = torch.cat([mask, torch.ones_like(completion_ids)], dim=1)  # [R, P+T]
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=T + 1)
    logits = out.logits[:, :-1] / hp.temperature  # [R, T, V] position P-1+t predicts token t
    # In the model's dtype (float32 here; a bfloat16 model would want .float() first).
    return logits.log_softmax(dim=-1).gather(-1, completion_ids[..., None]).squeeze(-1)  # [R, T]


def grpo_loss(logprobs, old_logprobs, ref_logprobs, A, mask, hp: Hyper) -> torch.Tensor:
    """-J of eq. 3 over the generation batch: the clipped surrogate minus beta * k3, masked through
    the first EOS, averaged over each completion's tokens, then over the completions.

    logprobs [R, T] with grad; old_logprobs [R, T] or None (mu = 1: old = logprobs.detach());
    ref_logprobs [R, T] or None (beta = 0); A [R]; mask [R, T]."""
    if old_logprobs is None:
        old_logprobs = logprobs.detach()  # [R, T] ratio 1 in value, grad log pi in gradient
    # Guard: after EOS the logprobs are of pad tokens never sampled; a log-ratio of 0 there keeps
    # exp() finite (inf * mask 0 would be NaN) and its gradient 0.
    log_ratio = torch.where(mask > 0, logprobs - old_logprobs, 0.0)  # [R, T]
    ratio = torch.exp(log_ratio)  # [R, T] pi_theta / pi_old
    A = A[:, None]  # [R, 1] one advantage for every token of a completion
    surrogate = torch.min(ratio * A, torch.clamp(ratio, 1 - hp.epsilon, 1 + hp.epsilon) * A)  # [R, T]
    per_token_loss = -surrogate  # [R, T]
    if hp.beta > 0:
        # Guard: exp overflows (float32 at ~88) on padding; cap log(pi_ref / pi) at 20 (grpo/kl.py).
        x = (ref_logprobs - logprobs).clamp(max=20.0)  # [R, T] log(pi_ref / pi_theta)
        kl = torch.expm1(x) - x  # [R, T] k3 = e^x - 1 - x, as expm1 so it stays >= 0 near x = 0
        per_token_loss = -(surrogate - hp.beta * kl)  # [R, T]
    # Guard: a completion with no token in the mask adds 0 / 1, not 0 / 0.
    per_completion = (per_token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [R] 1/|o_i| sum_t
    return per_completion.mean()  # [] 1/G sum_i, over all B groups


# --- the loop ---


def train(hp: Hyper, log=print) -> list[float]:
    """Run hp.steps GRPO steps; returns the mean reward of each step's completions."""
    torch.manual_seed(hp.seed)
    model, processor = load_policy(hp.init_from, dtype=hp.dtype, seed=hp.seed)
    special = special_token_ids(model, processor)
    eos = torch.tensor(special.eos_token_ids)  # [E] Qwen chat stops at <|im_end|> or <|endoftext|>
    reference = make_reference(model) if hp.beta > 0 else None  # frozen copy of the start
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, betas=(0.9, 0.99), weight_decay=hp.weight_decay)
    scenes = make_counting_dataset(hp.num_prompts, seed=hp.seed, image_size=hp.image_size, layout="grid")
    collate = GRPOCollator(processor, system_prompt=None)  # left-padded prompts, images, gold answers
    reward_functions = resolve_reward_functions(hp.reward_functions.split(","))
    weights = parse_reward_weights(hp.reward_weights, len(reward_functions))  # None: every weight 1
    generator = torch.Generator().manual_seed(hp.seed)
    mean_rewards, started = [], time.perf_counter()
    for step in range(1, hp.steps + 1):
        # 1. B prompts
        batch = collate([scenes[i] for i in torch.randint(len(scenes), (hp.B,), generator=generator).tolist()])
        # 2. G completions each from the current policy (pi_old of this step), masked through EOS
        completion_ids = sample_completions(model, batch, hp, eos, special.pad_token_id, generator)  # [R, T]
        mask = completion_mask(completion_ids, eos)  # [R, T]
        # 3. rewards: every reward function on the decoded text, weighted sum
        texts = processor.batch_decode(completion_ids, skip_special_tokens=True)
        rewards, per_function = compute_rewards(
            reward_functions, weights, texts, [a for a in batch["answers"] for _ in range(hp.G)],
            questions=[q for q in batch["questions"] for _ in range(hp.G)],
        )  # [R] float32, [R, F]
        if torch.isnan(rewards).any():  # a completion no function scored: the z-score needs them all
            raise ValueError(f"--reward_functions {hp.reward_functions}: some completions got no reward (None)")
        # 4. advantages
        A = group_advantages(rewards, hp.G, hp.std_eps)  # [R]
        # 5. old-policy and reference logprobs of the sampled tokens, no grad, eval mode (as the sampler left it)
        with torch.no_grad():
            old_logprobs = completion_logprobs(model, batch, completion_ids, hp) if hp.num_iterations > 1 else None
            ref_logprobs = completion_logprobs(reference, batch, completion_ids, hp) if hp.beta > 0 else None
        # 6. mu inner epochs on the same completions
        model.train()
        for _ in range(hp.num_iterations):
            logprobs = completion_logprobs(model, batch, completion_ids, hp)  # [R, T] with grad
            loss = grpo_loss(logprobs, old_logprobs, ref_logprobs, A, mask, hp)
            optimizer.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), hp.max_grad_norm)
            optimizer.step()
        mean_rewards.append(rewards.mean().item())
        each = " ".join(f"{name} {value:.2f}" for (name, _), value in zip(reward_functions, per_function.mean(0).tolist(), strict=True))
        log(f"step {step:3d} | reward {mean_rewards[-1]:.3f} ({each}) | loss {loss.item():+.4f} | grad_norm {grad_norm:.3f} "
            f"| length {mask.sum(1).mean():.1f} | {time.perf_counter() - started:.0f} s")  # fmt: skip
    return mean_rewards


def parse_args(argv=None) -> Hyper:
    """Every field of Hyper as a flag; a bad one exits 2 with the fix, before the model loads."""
    parser = argparse.ArgumentParser(prog="python -m grpo.minimal", description=__doc__.split("\n\n")[0])
    for f in fields(Hyper):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    hp = Hyper(**vars(parser.parse_args(argv)))
    path = Path(hp.init_from)
    if hp.init_from != "tiny" and not (path / "config.json").is_file():
        checkpoints = sorted(path.glob("checkpoint-*/model"))  # a train.py output_dir: its latest
        if not checkpoints:
            parser.error(f"--init_from {hp.init_from}: no model folder or train.py output_dir there; make one "
                         "with the SFT command at the top of grpo/minimal.py, or pass --init_from tiny")  # fmt: skip
        hp.init_from = str(checkpoints[-1])
    for name, low in {"G": 2, "B": 1, "steps": 1, "num_iterations": 1, "max_completion_length": 1, "num_prompts": 1, "image_size": 28}.items():
        if getattr(hp, name) < low:  # --G: a group needs a std; --image_size: one 28 x 28 image token
            parser.error(f"--{name} {getattr(hp, name)}: must be >= {low}")
    for name in ("temperature", "epsilon", "beta", "std_eps", "learning_rate", "weight_decay", "max_grad_norm"):
        if not 0 <= getattr(hp, name) < float("inf") or hp.temperature == 0:  # NaN fails every comparison
            parser.error(f"--{name} {getattr(hp, name)}: must be a finite number >= 0 (--temperature > 0: this file samples)")
    try:  # the model's type, the dtype, every module:function and every weight read now, not after loading
        if hp.init_from != "tiny":
            check_model_type("--init_from", f"{hp.init_from}: its config.json", json.loads((Path(hp.init_from) / "config.json").read_text()).get("model_type"))
        resolve_dtype(hp.dtype, torch.device("cpu"))
        parse_reward_weights(hp.reward_weights, len(resolve_reward_functions(hp.reward_functions.split(","))))
    except (ValueError, ImportError, AttributeError, TypeError) as error:
        parser.error(str(error))
    return hp


if __name__ == "__main__":
    hp = parse_args()
    torch.set_num_threads(1)  # the decode loop is many tiny ops: on a CPU one thread beats several
    started = time.perf_counter()
    rewards = train(hp)
    k = min(5, len(rewards))
    print(f"mean reward, first {k} steps {sum(rewards[:k]) / k:.3f} -> last {k} steps {sum(rewards[-k:]) / k:.3f} ({time.perf_counter() - started:.0f} s)")
