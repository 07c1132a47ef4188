"""One generation batch as the policy update sees it.

After the rollout, every forward of the step (old policy, reference, each micro-batch of each inner
epoch) needs the same things: the B prompts, the B*G sampled completions and the prompts' image
features. `GenerationBatch.logprobs(model, rows)` gives per-token logprobs for any subset of the
B*G rows (row r belongs to prompt r // G), and keeps two costs down:

- images are encoded once per prompt per forward, never once per completion; when the vision
  tower is frozen, the rollout's features are reused and the tower does not run at all;
- completion padding is trimmed to the longest completion among the rows asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from grpo.forward import completion_logprobs, encode_images, image_inputs_for_rows


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
        if reuse_rollout_images:
            image_embeds, grid, per_prompt, local_rows = (
                self.rollout_image_embeds, self.image_grid_thw, self.images_per_prompt, rows_list
            )
        else:
            prompts = sorted({r // G for r in rows_list})
            image_embeds = self._encode_prompts(model, prompts)  # [N_prompts, D]
            grid = torch.cat([self.image_grid_thw[self._image_slice(p)] for p in prompts])  # [images, 3]
            per_prompt = [self.images_per_prompt[p] for p in prompts]
            # Renumber rows as if the batch held only these prompts.
            local_rows = [prompts.index(r // G) * G + r % G for r in rows_list]
        embeds, grids = image_inputs_for_rows(image_embeds, grid, per_prompt, G, local_rows, self.spatial_merge_size)
        prompt_rows = rows // G
        return completion_logprobs(
            model,
            self.prompt_ids[prompt_rows],  # [R, P]
            self.prompt_mask[prompt_rows],  # [R, P]
            self.completion_ids[rows, :length],  # [R, T_rows]
            self.completion_mask[rows, :length],  # [R, T_rows]
            embeds,
            grids,
            temperature=self.temperature or 1.0,  # greedy rollouts are scored at tau = 1
            return_entropy=return_entropy,
        )

    def _image_slice(self, prompt: int) -> slice:
        start = sum(self.images_per_prompt[:prompt])
        return slice(start, start + self.images_per_prompt[prompt])
