"""The training forward with the prompt computed once per group, against G times (the naive twin).

Every completion row run as [prompt ; completion] (grpo/engine/forward.py `completion_logprobs`, the
naive twin) puts each prompt's P tokens through the language model G times per forward and G
times more in the backward: with the synthetic demo's prompts (P = 122: R1 system prompt + 16
image tokens + question) and T = 32, 79% of the tokens are prompt copies.
`completion_logprobs_shared_prompt` (the default training, old-policy and reference forward,
`--shared_prompt_forward`) runs the prompt once, copies its KV cache to the G rows (the backward
sums the copies' gradients) and runs only the completions on top; its docstring has the steps.
This script checks that logprobs and every parameter's gradient agree (max abs differences
printed) and times one group's forward + backward (and the no-grad forward used for old/ref
logprobs) both ways, interleaved, on the tiny-small preset. It was first written as the
proposal's prototype (docs/benchmarks.md, proposal A); it now measures the project's function.

    OMP_NUM_THREADS=1 .venv/bin/python bench/shared_prompt_forward.py            # ~1-2 min
    OMP_NUM_THREADS=1 .venv/bin/python bench/shared_prompt_forward.py --max_new_tokens 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import counting_batch, machine_info, median, never_sampled_eos, tensors_only

from grpo.engine.forward import completion_logprobs, completion_logprobs_shared_prompt
from grpo.engine.inputs import encode_images
from grpo.engine.rollout import sample_rollouts
from models.loading import load_policy, special_token_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny-small")
    parser.add_argument("--group_size", type=int, default=8, help="G (= the micro-batch: one group)")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="T")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_info())

    model, processor = load_policy(args.preset)
    tokens = special_token_ids(model, processor)
    batch = tensors_only(counting_batch(processor, 1))
    G, T = args.group_size, args.max_new_tokens
    rollout = sample_rollouts(model, batch, group_size=G, max_new_tokens=T, eos_token_ids=[never_sampled_eos(model)],
                              pad_token_id=tokens.pad_token_id, generator=torch.Generator().manual_seed(0))
    completion_ids = rollout.completion_ids  # [G, T]
    prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]  # [1, P]
    model.train()

    def full(grad: bool):
        """What the loop does today: G rows of [prompt ; completion], the image encoded once."""
        with torch.set_grad_enabled(grad):
            image_embeds = encode_images(model, batch["pixel_values"], batch["image_grid_thw"])  # [N, D]
            logprobs = completion_logprobs(
                model, prompt_ids.expand(G, -1), prompt_mask.expand(G, -1), completion_ids, None,
                image_embeds.repeat(G, 1), batch["image_grid_thw"].repeat(G, 1),
            )  # [G, T]
            if grad:
                logprobs.sum().backward()
        return logprobs.detach()

    def shared(grad: bool):
        with torch.set_grad_enabled(grad):
            image_embeds = encode_images(model, batch["pixel_values"], batch["image_grid_thw"])  # [N, D]
            logprobs = completion_logprobs_shared_prompt(
                model, prompt_ids, prompt_mask, torch.zeros(G, dtype=torch.long), completion_ids, None,
                image_embeds, batch["image_grid_thw"],
            )  # [G, T]
            if grad:
                logprobs.sum().backward()
        return logprobs.detach()

    # Agreement: logprobs and every parameter's gradient.
    model.zero_grad()
    reference_logprobs = full(True)
    reference_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    shared_logprobs = shared(True)
    max_logprob_diff = float((shared_logprobs - reference_logprobs).abs().max())
    max_grad_diff = max(float((p.grad - reference_grads[n]).abs().max()) for n, p in model.named_parameters()
                        if p.grad is not None)
    max_grad = max(float(g.abs().max()) for g in reference_grads.values())

    times = {(name, grad): [] for name in ("full", "shared") for grad in (True, False)}
    for round_index in range(args.repeats):
        order = (("full", full), ("shared", shared)) if round_index % 2 == 0 else (("shared", shared), ("full", full))
        for grad in (True, False):
            for name, fn in order:
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                fn(grad)
                times[(name, grad)].append(time.perf_counter() - start)
    P = prompt_ids.shape[1]
    result = {
        "preset": args.preset, "P": P, "G": G, "T": T,
        "prompt_share_of_tokens": G * P / (G * (P + T)),
        "tokens_full": G * (P + T), "tokens_shared": P + G * (T - 1),  # token T-1 is only a target
        "max_abs_logprob_diff": max_logprob_diff, "max_abs_grad_diff": max_grad_diff, "max_abs_grad": max_grad,
        **{f"{name}_{'fwd_bwd' if grad else 'no_grad_fwd'}_s": median(ts) for (name, grad), ts in times.items()},
    }
    result["speedup_fwd_bwd"] = result["full_fwd_bwd_s"] / result["shared_fwd_bwd_s"]
    result["speedup_no_grad_fwd"] = result["full_no_grad_fwd_s"] / result["shared_no_grad_fwd_s"]
    print(json.dumps(result))
    print()
    print("| preset | P | G x T | tokens full / shared | fwd+bwd s full / shared (median) | speedup "
          "| no-grad fwd s full / shared | speedup | max abs diff logprob / grad (max grad) |")
    print("|---|---|---|---|---|---|---|---|---|")
    r = result
    print(f"| {r['preset']} | {P} | {G} x {T} | {r['tokens_full']} / {r['tokens_shared']} "
          f"| {r['full_fwd_bwd_s']:.2f} / {r['shared_fwd_bwd_s']:.2f} | {r['speedup_fwd_bwd']:.2f}x "
          f"| {r['full_no_grad_fwd_s']:.2f} / {r['shared_no_grad_fwd_s']:.2f} | {r['speedup_no_grad_fwd']:.2f}x "
          f"| {r['max_abs_logprob_diff']:.1e} / {r['max_abs_grad_diff']:.1e} ({r['max_abs_grad']:.1e}) |")


if __name__ == "__main__":
    main()
