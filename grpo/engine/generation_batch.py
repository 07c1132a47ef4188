"""One generation batch as the policy update sees it.

After the rollout, every forward of the step (old policy, reference, each micro-batch of each inner
epoch) needs the same things: the B prompts, the B*G sampled completions and the prompts' image
features. `GenerationBatch.logprobs(model, rows)` gives per-token logprobs for any subset of the
B*G rows (row r belongs to prompt r // G), and keeps two costs down:

- images are encoded once per prompt per forward, never once per completion; when the vision
  tower is frozen, the rollout's features are reused and the tower does not run at all;
- completion padding is trimmed to the longest completion among the rows asked for;
- with `shared_prompt` (the default; `--shared_prompt_forward`), each prompt among the rows asked
  for runs through the model once and its KV cache is copied to its completions
  (`completion_logprobs_shared_prompt`), instead of once per completion (`completion_logprobs`,
  the naive twin, used under gradient checkpointing, which turns the KV cache off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from grpo.engine.forward import completion_logprobs, completion_logprobs_shared_prompt
from grpo.engine.hf_compat import can_share_prompt
from grpo.engine.inputs import encode_images, image_inputs_for_rows


@dataclass
class GenerationBatch:
    prompt_ids: Tensor  # [B, P] left padded
    prompt_mask: Tensor  # [B, P]
    pixel_values: Tensor  # [patches of all images, patch_dim]
    image_grid_thw: Tensor  # [images, 3]
    images_per_prompt: list[int]
    completion_ids: Tensor  # [B*G, T]
    completion_mask: Tensor  # [B*G, T] 1 through the first EOS
    rollout_image_embeds: Tensor  # [N, D] per prompt, as the sampler encoded them
    group_size: int
    temperature: float  # the sampling temperature; the loss scores softmax(logits / temperature)
    spatial_merge_size: int
    shared_prompt: bool = True  # each prompt computed once per forward, its KV cache copied to its rows

    def _encode_prompts(self, model, prompts: list[int]) -> Tensor:
        """The vision tower on just these prompts' images, once each: [N_prompts, D]."""
        patches_per_image = self.image_grid_thw.prod(-1).tolist()  # [images]
        first_image = [sum(self.images_per_prompt[:p]) for p in range(len(self.images_per_prompt) + 1)]
        first_patch = [sum(patches_per_image[:i]) for i in range(len(patches_per_image) + 1)]
        images = [i for p in prompts for i in range(first_image[p], first_image[p + 1])]
        patch_rows = torch.cat([torch.arange(first_patch[i], first_patch[i + 1]) for i in images])
        return encode_images(model, self.pixel_values[patch_rows.to(self.pixel_values.device)], self.image_grid_thw[images])

    def logprobs(self, model, rows: Tensor, *, reuse_rollout_images: bool, return_entropy: bool = False):
        """Per-token logprobs [R, T_rows] of completion rows `rows` under `model` (and entropy if asked).

        T_rows is the longest completion among the rows; grad follows the caller's grad mode.
        """
        G = self.group_size
        rows_list = rows.tolist()
        length = int(self.completion_mask[rows].sum(1).max().clamp(min=1))
        prompts = sorted({r // G for r in rows_list})  # the distinct prompts these rows continue
        if reuse_rollout_images:
            image_embeds, grid, per_prompt = self.rollout_image_embeds, self.image_grid_thw, self.images_per_prompt
            prompt_index = prompts  # index of each of `prompts` among those embeddings
        else:
            image_embeds = self._encode_prompts(model, prompts)  # [N_prompts, D]
            grid = torch.cat([self.image_grid_thw[self._image_slice(p)] for p in prompts])  # [images, 3]
            per_prompt = [self.images_per_prompt[p] for p in prompts]
            prompt_index = list(range(len(prompts)))
        completion_ids = self.completion_ids[rows, :length]  # [R, T_rows]
        completion_mask = self.completion_mask[rows, :length]  # [R, T_rows]
        temperature = self.temperature  # 0 (greedy) is scored at tau = 1 (forward.py, _score)

        if self.shared_prompt and can_share_prompt(model):
            # Images per distinct prompt (group size 1: "row" i is prompt i), prompts once each.
            embeds, grids = image_inputs_for_rows(image_embeds, grid, per_prompt, 1, prompt_index, self.spatial_merge_size)
            row_prompt = torch.tensor([prompts.index(r // G) for r in rows_list])  # [R] into `prompts`
            prompt_rows = torch.tensor(prompts)  # [U]
            return completion_logprobs_shared_prompt(
                model, self.prompt_ids[prompt_rows], self.prompt_mask[prompt_rows], row_prompt,
                completion_ids, completion_mask, embeds, grids,
                temperature=temperature, return_entropy=return_entropy,
            )

        # Naive twin: every row runs as [prompt ; completion], images copied to each row.
        local_rows = [prompt_index[prompts.index(r // G)] * G + r % G for r in rows_list]
        embeds, grids = image_inputs_for_rows(image_embeds, grid, per_prompt, G, local_rows, self.spatial_merge_size)
        prompt_rows = rows // G
        return completion_logprobs(
            model,
            self.prompt_ids[prompt_rows],  # [R, P]
            self.prompt_mask[prompt_rows],  # [R, P]
            completion_ids,
            completion_mask,
            embeds,
            grids,
            temperature=temperature,
            return_entropy=return_entropy,
        )

    def _image_slice(self, prompt: int) -> slice:
        start = sum(self.images_per_prompt[:prompt])
        return slice(start, start + self.images_per_prompt[prompt])
