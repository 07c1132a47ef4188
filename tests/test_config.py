"""The typed config: defaults run offline, bad settings fail at start with the flag and the fix."""

import json
import re

import pytest

from grpo.config import ConfigError, parse_config


def test_defaults_are_the_offline_demo():
    config = parse_config([])
    assert config.model.model == "tiny"
    assert config.data.dataset == "synthetic"
    assert config.train.stage == "grpo"
    # epsilon_high defaults to epsilon (symmetric clip: GRPO; set it higher for DAPO's clip-higher)
    assert config.grpo.epsilon_high == config.grpo.epsilon == 0.2


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--num_generations", "1"], "--num_generations"),
        (["--beta", "-0.1"], "--beta"),
        (["--epsilon", "1.0"], "--epsilon"),
        (["--epsilon_high", "-0.5"], "--epsilon_high"),
        (["--max_completion_length", "0"], "--max_completion_length"),
        (["--loss_aggregation", "mean"], "--loss_aggregation"),
        (["--advantage_scale", "rank"], "--advantage_scale"),
        (["--stage", "ppo"], "--stage"),
        (["--freeze_policy", "half"], "--freeze_policy"),
        # 3 prompts x 4 completions = 12 completions do not split into micro-batches of 5
        (["--per_device_prompts", "3", "--num_generations", "4", "--micro_batch_size", "5"], "--micro_batch_size"),
        # 12 completions do not split into 5 optimizer steps
        (["--per_device_prompts", "3", "--num_generations", "4", "--steps_per_generation", "5"], "--steps_per_generation"),
        (["--reward_functions", "format,count_accuracy", "--reward_weights", "1.0"], "--reward_weights"),
        (["--val_fraction", "1.5"], "--val_fraction"),
        (["--long_prompts", "truncate"], "--long_prompts"),
        (["--dynamic_sampling", "--max_generation_rounds", "0"], "--max_generation_rounds"),
        (["--max_completion_length", "8", "--overlong_buffer_length", "9"], "--overlong_buffer_length"),
        (["--overlong_buffer_length", "0"], "--overlong_buffer_length"),
        (["--top_entropy_quantile", "1.5"], "--top_entropy_quantile"),
        (["--top_entropy_quantile", "-0.1"], "--top_entropy_quantile"),
    ],
)
def test_impossible_settings_name_the_flag(argv, flag):
    with pytest.raises(ConfigError, match=flag):
        parse_config(argv)


def test_unknown_flag_is_an_error():
    with pytest.raises(ConfigError, match="--not_a_flag"):
        parse_config(["--not_a_flag", "3"])


def test_config_file_with_cli_override(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"beta": 0.0, "num_generations": 4, "learning_rate": 3e-4}))
    config = parse_config(["--config", str(path), "--num_generations", "6"])
    assert config.grpo.beta == 0.0  # from the file
    assert config.train.learning_rate == 3e-4  # from the file
    assert config.grpo.num_generations == 6  # the CLI wins


def test_config_yaml_roundtrip_of_to_dict(tmp_path):
    import yaml

    config = parse_config(["--stage", "sft", "--max_steps", "7"])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    again = parse_config(["--config", str(path)])
    assert again.to_dict() == config.to_dict()


def test_config_file_unknown_key(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"betta": 0.1}))
    with pytest.raises(ConfigError, match="betta"):
        parse_config(["--config", str(path)])


def test_overlong_buffer_defaults_to_a_fifth_of_the_completion_limit():
    # DAPO's 4096 of 20480 tokens; 64 // 5 = 12
    assert parse_config(["--max_completion_length", "64"]).grpo.overlong_buffer_length == 12
    assert parse_config(["--max_completion_length", "3"]).grpo.overlong_buffer_length == 1  # at least 1


def test_freeze_policy_has_a_name_that_says_what_trains_and_the_old_name_still_works():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name: no warning at all
        assert parse_config(["--freeze_policy", "projector_embeddings_first_layers"]).model.freeze_policy == (
            "projector_embeddings_first_layers"
        )
    with pytest.warns(FutureWarning, match="--freeze_policy seed is deprecated.*projector_embeddings_first_layers"):
        config = parse_config(["--freeze_policy", "seed"])
    assert config.model.freeze_policy == "projector_embeddings_first_layers"  # what a checkpoint records


def test_old_freeze_policy_name_trains_the_same_parameters():
    from models.freeze import apply_freeze_policy
    from models.tiny import build_tiny_policy

    new, old = build_tiny_policy(seed=0)[0], build_tiny_policy(seed=0)[0]
    counts_new = apply_freeze_policy(new, "projector_embeddings_first_layers", num_trainable_layers=1)
    with pytest.warns(FutureWarning, match="projector_embeddings_first_layers"):
        counts_old = apply_freeze_policy(old, "seed", num_trainable_layers=1)
    assert counts_old == counts_new
    assert [n for n, p in old.named_parameters() if p.requires_grad] == [
        n for n, p in new.named_parameters() if p.requires_grad
    ]
    assert 0 < counts_new["trainable"] < counts_new["total"]  # a real subset, not everything or nothing


def _help_sections(text: str, titles: list[str]) -> dict[str, list[str]]:
    """The long flags (`--name`, not the `--no_name` twins) listed under each group title of --help."""
    sections, current = {}, None
    for line in text.splitlines():
        if line.endswith(":") and line[:-1] in titles + ["options"]:
            current = sections.setdefault(line[:-1], [])
        elif current is not None and (match := re.match(r"  --(\w+)", line)) and not match.group(1).startswith("no_"):
            current.append(match.group(1))
    return sections


def test_help_lists_every_flag_once_in_tiers_core_grpo_first():
    from dataclasses import fields

    from grpo.config import ALL_ARGUMENTS, HELP_TIERS, build_parser

    titles = [title for title, _, _ in HELP_TIERS]
    text = build_parser().format_help()
    # the groups appear in HELP_TIERS' order: the minimal loop's flags, the objective, the engine, the run
    assert [line[:-1] for line in text.splitlines() if line[:-1] in titles] == titles
    assert titles[0].startswith("GRPO: the minimal loop") and titles[1].startswith("GRPO objective")
    assert titles[2] == "engine and speed" and titles[3].startswith("run")
    # each group lists exactly its tier's flags, in the tier's order; nothing is left untiered
    sections = _help_sections(text, titles)
    assert sections.pop("options", []) == [], "a flag without a tier: add it to grpo/config.py HELP_TIERS"
    assert sections == {title: list(names) for title, _, names in HELP_TIERS}
    # every flag in exactly one tier: the dataclass fields and --config, each once
    tiered = [name for _, _, names in HELP_TIERS for name in names]
    flags = [f.name for cls in ALL_ARGUMENTS for f in fields(cls)] + ["config"]
    assert sorted(tiered) == sorted(flags)
    # the hyper-parameters a minimal GRPO has come first
    core = set(HELP_TIERS[0][2])
    assert {"num_generations", "per_device_prompts", "max_completion_length", "temperature", "learning_rate", "beta",
            "epsilon", "num_iterations", "max_steps"} <= core  # fmt: skip


def test_tiered_help_parses_as_before():
    # The tiers only order the help: a flag from each tier still reaches its dataclass field.
    config = parse_config(["--num_generations", "4", "--kl_estimator", "k2", "--micro_batch_size", "2",
                           "--no_shared_prompt_forward", "--seed", "3", "--eval_steps", "5"])  # fmt: skip
    assert (config.grpo.num_generations, config.grpo.kl_estimator, config.grpo.micro_batch_size) == (4, "k2", 2)
    assert (config.grpo.shared_prompt_forward, config.train.seed, config.sft.eval_steps) == (False, 3, 5)


def test_trls_sampler_correction_names_are_aliases_of_ours():
    # TRL's vllm_importance_sampling_{mode, clip_max, clip_min} set --sampler_correction,
    # --sampler_correction_cap and --sampler_correction_min (the same modes, the same bounds).
    config = parse_config([
        "--stage", "grpo", "--output_dir", "unused", "--vllm_importance_sampling_mode", "sequence_mask",
        "--vllm_importance_sampling_clip_max", "2.5", "--vllm_importance_sampling_clip_min", "0.5",
    ])  # fmt: skip
    assert (config.grpo.sampler_correction, config.grpo.sampler_correction_cap) == ("sequence_mask", 2.5)
    assert config.grpo.sampler_correction_min == 0.5
    assert config.grpo.loss_options.sampler_correction == "sequence_mask"
