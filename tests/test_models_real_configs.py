"""Shape tests on the real Qwen2.5-VL-3B and Qwen2.5-0.5B architectures, built on the meta device.

No weights are downloaded or allocated: tests/fixtures holds the published config.json files,
and `with torch.device("meta")` builds every parameter as a shape without data.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_models_real_configs.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from models.freeze import apply_freeze_policy
from models.graft import (
    REINITIALISED_KEYS,
    build_graft_config,
    text_key_to_vl_key,
    vision_key_to_vl_key,
)

FIXTURES = Path(__file__).parent / "fixtures"
# Qwen2.5's token ids (the same in the 0.5B LM and the VL-3B tokenizers).
QWEN_TOKEN_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
    "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
}

# --- Qwen2.5-VL-3B parameter count, worked by hand (tied embeddings counted once) ---
# Text (hidden 2048, 36 layers, 16 heads of 128, 2 KV heads -> k/v out 256, intermediate 11008):
#   embed_tokens 151,936 * 2048                                  = 311,164,928  (= lm_head, tied)
#   per layer: q 2048*2048 + 2048 bias                           =   4,196,352
#              k, v 2048*256 + 256 bias, each                    =     524,544 (x2)
#              o 2048*2048                                       =   4,194,304
#              gate, up, down 2048*11008 each                    =  67,633,152
#              2 RMSNorms 2 * 2048                               =       4,096
#              layer total                                       =  77,076,992; x36 = 2,774,771,712
#   final norm                                                   =       2,048
#   text total                                                   = 3,085,938,688
# Vision (hidden 1280, 32 blocks, intermediate 3420, biases on every Linear):
#   patch_embed Conv3d 1280 * (3*2*14*14 = 1176), no bias        =   1,505,280
#   per block: 2 RMSNorms 2*1280                                 =       2,560
#              qkv 1280*3840 + 3840                              =   4,919,040
#              proj 1280*1280 + 1280                             =   1,639,680
#              gate, up 1280*3420 + 3420 each                    =   8,762,040
#              down 3420*1280 + 1280                             =   4,378,880
#              block total                                       =  19,702,200; x32 = 630,470,400
#   merger: ln_q 1280; mlp.0 5120*5120 + 5120; mlp.2 5120*2048 + 2048
#                = 1,280 + 26,219,520 + 10,487,808               =  36,708,608
#   vision total                                                 =   668,684,288
# Total                                                          = 3,754,622,976  (~3.75 B)
# The seed's peft printout "all params: 3,756,466,176" is this plus its 1,843,200 LoRA parameters.
VL3B_TEXT = 3_085_938_688
VL3B_VISION = 668_684_288
VL3B_TOTAL = 3_754_622_976
VL3B_LAYER = 77_076_992
VL3B_EMBED = 311_164_928
VL3B_MERGER_OUT = 10_487_808
# Qwen2.5-0.5B: embed 151,936*896 = 136,134,656; layer = q 803,712 + k,v 2*114,816 + o 802,816
# + mlp 3*896*4864 = 13,074,432 + norms 1,792 = 14,912,384; x24 + final norm 896 -> 494,032,768.
QWEN05B_TOTAL = 494_032_768


@pytest.fixture(scope="module")
def vl_config() -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig.from_json_file(FIXTURES / "qwen2_5_vl_3b_config.json")


@pytest.fixture(scope="module")
def text_config() -> Qwen2Config:
    return Qwen2Config.from_json_file(FIXTURES / "qwen2_5_0_5b_config.json")


def meta_vl(config) -> Qwen2_5_VLForConditionalGeneration:
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(config)


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_fixture_configs(vl_config, text_config):
    text, vision = vl_config.text_config, vl_config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (2048, 36, 16, 2)
    assert (text.intermediate_size, text.vocab_size, vl_config.tie_word_embeddings) == (11008, 151936, True)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size) == (32, 1280, 16, 3420)
    assert (vision.patch_size, vision.spatial_merge_size, vision.window_size, vision.out_hidden_size) == (14, 2, 112, 2048)
    assert list(vision.fullatt_block_indexes) == [7, 15, 23, 31]
    assert vl_config.image_token_id == QWEN_TOKEN_IDS["<|image_pad|>"]
    assert (text_config.hidden_size, text_config.num_hidden_layers, text_config.num_attention_heads) == (896, 24, 14)
    assert (text_config.num_key_value_heads, text_config.intermediate_size, text_config.tie_word_embeddings) == (2, 4864, True)


def test_vl3b_parameter_count(vl_config):
    model = meta_vl(vl_config)
    assert numel(model.model.visual) == VL3B_VISION
    assert numel(model) == VL3B_TOTAL
    assert abs(numel(model) - 3.75e9) / 3.75e9 < 0.01
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight


def test_vl3b_freeze_policies(vl_config):
    model = meta_vl(vl_config)
    assert apply_freeze_policy(model, "full") == {"trainable": VL3B_TOTAL, "total": VL3B_TOTAL}
    assert apply_freeze_policy(model, "language") == {"trainable": VL3B_TEXT, "total": VL3B_TOTAL}
    # seed: merger.mlp.2 + embed_tokens (= lm_head) + 5 decoder layers = 707,037,696
    seed = apply_freeze_policy(model, "projector_embeddings_first_layers", num_trainable_layers=5)
    assert seed == {"trainable": VL3B_MERGER_OUT + VL3B_EMBED + 5 * VL3B_LAYER, "total": VL3B_TOTAL}
    # lora r=8 on q_proj (2048 -> 2048) and v_proj (2048 -> 256) of 36 layers:
    # 8 * (2048 + 2048) + 8 * (2048 + 256) = 51,200 per layer; x36 = 1,843,200 (the seed's number).
    lora = apply_freeze_policy(model, "lora", lora_targets=("q_proj", "v_proj"), lora_r=8, lora_alpha=32)
    assert lora == {"trainable": 1_843_200, "total": VL3B_TOTAL + 1_843_200}
    assert lora["total"] == 3_756_466_176  # "all params" in the seed's print_trainable_parameters


def test_graft_key_mapping_covers_every_05b_key(vl_config, text_config):
    with torch.device("meta"):
        lm = Qwen2ForCausalLM(text_config)
    assert numel(lm) == QWEN05B_TOTAL
    grafted = meta_vl(build_graft_config(vl_config, text_config, QWEN_TOKEN_IDS))
    target = {k: v.shape for k, v in grafted.state_dict().items()}
    source_vl = meta_vl(vl_config)

    covered = set()
    for key, tensor in lm.state_dict().items():  # every 0.5B key, lm_head included
        vl_key = text_key_to_vl_key(key)
        assert target[vl_key] == tensor.shape, key
        covered.add(vl_key)
    for key, tensor in source_vl.model.visual.state_dict().items():
        vl_key = vision_key_to_vl_key(key)
        if vl_key in REINITIALISED_KEYS:
            continue
        assert target[vl_key] == tensor.shape, key
        covered.add(vl_key)
    assert set(target) - covered == set(REINITIALISED_KEYS)
    assert target["model.visual.merger.mlp.2.weight"] == (896, 5120)
    assert grafted.config.text_config.rope_parameters["mrope_section"] == [8, 12, 12]  # head_dim 64
    # 668,684,288 vision - 10,487,808 old mlp.2 + (5120*896 + 896 = 4,588,416) new + 494,032,768 LM
    assert numel(grafted) == 1_156_817_664
