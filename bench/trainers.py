"""Run OUR GRPO loop or TRL's GRPOTrainer for a few steps and record what a benchmark needs.

Used by bench/grpo_step_vs_trl.py and bench/vision_calls.py, each trainer in its own subprocess:

    python bench/trainers.py --trainer ours|trl --model_dir DIR --out result.json [setting flags]

Both trainers get the same setting: the same saved Qwen2.5-VL (a save_pretrained folder), the same
prompts in the same order (our data pipeline draws them; TRL gets them as a dataset in that order
with shuffle_dataset=False), the same G, B, micro-batch, completion length, num_iterations, beta,
loss aggregation (ours "sequence" = TRL loss_type "grpo"), optimiser settings, device and dtype
(default CPU float32; --device cuda --dtype bfloat16: ours `--device cuda --dtype bfloat16`, TRL
use_cpu=False, bf16=True, weights loaded in bfloat16), no gradient checkpointing, one torch thread
by default, and the same reward functions (TRL calls ours, grpo.reward_functions.format_reward and
count_accuracy_reward, through thin wrappers).

Equal completion lengths (every completion exactly T = max_completion_length tokens):
  - ours: the loop's EOS ids are replaced by one id past the vocabulary (never sampled), by
    wrapping `build_policy` in the loop's namespace; EOS tokens become ordinary tokens.
  - TRL:  `generation_kwargs={"min_new_tokens": T}`: transformers' MinNewTokensLength processor
    sets the logits of every EOS id to -inf for the first T tokens, so generate never stops early
    and TRL's completion mask is all ones.
Both assertions are checked from the trainers' own metrics (mean completion length == T).

What is recorded (written as JSON to --out):
  - step_end: time.perf_counter() at the end of every optimizer step (ours: when the loop logs the
    step's metrics; TRL: the on_step_end callback). One generation batch = num_iterations steps.
  - batch_end, waited: perf_counter at the end of each generation batch's last step, and the total
    time blocked on the Gate so far (see Gate: interleaving with the other trainer's process).
    Batch k's own time = (batch_end[k] - batch_end[k-1]) - (waited[k] - waited[k-1]): everything
    the trainer did between the two ends (next prompts, rollout, rewards, old/ref logprobs, the
    updates, its logging), minus the time it was parked while the other trainer ran.
    batch_end_cpu: time.process_time() at the same moments. On a shared machine CPU seconds are the
    steadier measure of work: a process that is descheduled by someone else's job loses wall time
    but not CPU time, and a parked process uses none.
  - vision: a forward pre-hook on `model.model.visual` of the policy and of the reference counts
    vision-tower calls and images (image_grid_thw rows) per step and per forward kind: rollout
    (inside the sampler / generate), old (policy, no grad, outside the sampler), ref (reference
    model), train (policy, grad enabled).
  - rollout_seconds: wall time inside the sampler (ours: sample_rollouts; TRL: _generate_single_turn,
    i.e. model.generate on the B*G repeated prompts), one entry per generation batch.
  - rss_train_start_mb: VmRSS when the first rollout starts (model, reference, data loaded);
    peak_rss_mb: VmHWM at the end (the whole process's peak resident set).
  - on CUDA also gpu_train_start_mb (torch.cuda.memory_allocated when the first rollout starts),
    gpu_peak_allocated_mb / gpu_peak_reserved_mb (torch.cuda.max_memory_allocated / _reserved at
    the end: tensors' peak, and what the caching allocator held at most). Every timestamp above is
    taken after torch.cuda.synchronize(), so it includes the GPU work queued before it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, never_sampled_eos  # noqa: E402

SYNC_CUDA = False  # set in main() for --device cuda: timestamps wait for queued GPU work


def _now() -> float:
    """time.perf_counter(), after the GPU has finished what was queued (on CUDA)."""
    if SYNC_CUDA:
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def _gpu_mb(stat: str) -> float | None:
    """torch.cuda.<stat>() in MB on CUDA runs (memory_allocated, max_memory_allocated, ...), else None."""
    if not SYNC_CUDA:
        return None
    import torch

    return getattr(torch.cuda, stat)() / 2**20


def _proc_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


class VisionCounter:
    """Forward pre-hooks on vision towers; counts calls and images per (step, forward kind)."""

    def __init__(self):
        self.phase_override = None  # "rollout" while the sampler runs
        self.step = 0  # optimizer steps finished so far; calls are charged to step + 1
        self.counts = defaultdict(lambda: defaultdict(lambda: [0, 0]))  # step -> kind -> [calls, images]

    def attach(self, visual, role: str):
        import torch

        def hook(module, args, kwargs):
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            images = int(grid.shape[0]) if grid is not None else 0
            if self.phase_override is not None:
                kind = self.phase_override
            elif role == "reference":
                kind = "ref"
            elif torch.is_grad_enabled():
                kind = "train"
            else:
                kind = "old"
            entry = self.counts[self.step + 1][kind]
            entry[0] += 1
            entry[1] += images

        visual.register_forward_pre_hook(hook, with_kwargs=True)

    def as_json(self) -> dict:
        return {str(step): {kind: list(v) for kind, v in kinds.items()} for step, kinds in self.counts.items()}


class Gate:
    """Step-level interleaving of two trainer processes through a pair of pipes.

    Before each generation batch the worker blocks until the parent writes one byte; after the
    batch's last optimizer step it writes one byte back. The parent lets the two trainers run one
    generation batch at a time, alternately, so they never compete for the cores and a slow spell
    of the shared machine hits both. Time spent blocked is subtracted from the batch times.
    Without fds (a stand-alone run) it does nothing.
    """

    def __init__(self, fds: str | None):
        self.read_fd, self.write_fd = (int(x) for x in fds.split(",")) if fds else (None, None)
        self.waited = 0.0

    def wait(self) -> None:
        if self.read_fd is None:
            return
        start = time.perf_counter()
        if os.read(self.read_fd, 1) != b"g":
            raise RuntimeError("gate closed by the parent")
        self.waited += time.perf_counter() - start

    def done(self) -> None:
        if self.write_fd is not None:
            os.write(self.write_fd, b"d")


def _end_batch(record: dict, gate: Gate) -> None:
    record["batch_end"].append(_now())
    record["batch_end_cpu"].append(time.process_time())  # CPU seconds of the whole process, all threads
    record["waited"].append(gate.waited)
    gate.done()


def our_argv(args, output_dir: str) -> list[str]:
    """Our train.py flags for the shared setting."""
    return [
        "--stage", "grpo", "--model", args.model_dir, "--dataset", "synthetic",
        "--num_examples", str(args.num_examples), "--seed", "0", "--device", args.device, "--dtype", args.dtype,
        "--per_device_prompts", str(args.num_prompts), "--num_generations", str(args.group_size),
        "--micro_batch_size", str(args.micro_batch_size), "--max_completion_length", str(args.max_completion_length),
        "--num_iterations", str(args.num_iterations), "--beta", str(args.beta),
        "--loss_aggregation", "sequence", "--advantage_scale", "group", "--temperature", "1.0",
        "--learning_rate", str(args.learning_rate), "--weight_decay", "0.1", "--adam_beta2", "0.99", "--max_grad_norm", "1.0",
        "--reward_functions", "format,count_accuracy", "--freeze_policy", args.freeze_policy,
        "--max_steps", str(args.num_batches * args.num_iterations), "--output_dir", output_dir,
        "--overwrite_output_dir", "--progress_bar", "false", "--save_steps", "0",
        "--sample_log_steps", "1000000", "--logging_steps", "1000000",
        # The pre-flight micro-batch is a start-up check, not part of a step (TRL has none); it
        # would also call the collator, where the gate waits for the parent's go for a batch.
        "--skip_preflight", "true",
    ]


def patch_everywhere(name: str, make_wrapper, module_names: tuple[str, ...]) -> None:
    """Replace attribute `name` in each listed module that has it by make_wrapper(original).

    Modules that import the same original share one wrapper; at least one must have it."""
    import importlib

    wrapped = {}
    for module_name in module_names:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        original = getattr(module, name, None)
        if original is None:
            continue
        if id(original) not in wrapped:
            wrapped[id(original)] = make_wrapper(original)
        setattr(module, name, wrapped[id(original)])
    if not wrapped:
        raise RuntimeError(f"none of {module_names} has {name!r}: the loop moved it; update bench/trainers.py")


def _timed_rollout(original, record: dict, counter):
    """Wrap a trainer's rollout function (ours: sample_rollouts; TRL: _generate_single_turn): time
    it, attribute vision calls inside it to "rollout", and note RSS / GPU memory at the first one."""

    def rollout(*a, **kw):
        if record["rss_train_start_mb"] is None:
            record["rss_train_start_mb"] = _proc_mb("VmRSS")
            record["gpu_train_start_mb"] = _gpu_mb("memory_allocated")
        counter.phase_override = "rollout"
        start = _now()
        try:
            return original(*a, **kw)
        finally:
            counter.phase_override = None
            record["rollout_seconds"].append(_now() - start)

    return rollout


def run_ours(args, output_dir: str, gate: Gate) -> dict:
    import data.collators
    import grpo.grpo_loop as loop
    from grpo.config import parse_config

    config = parse_config(our_argv(args, output_dir))
    counter = VisionCounter()
    record = {"step_end": [], "completion_length_mean": [], "rss_train_start_mb": None, "rollout_seconds": [],
              "batch_end": [], "batch_end_cpu": [], "waited": [], "gpu_train_start_mb": None}

    def build_policy_wrapper(original):
        def build_policy(*a, **kw):
            policy = original(*a, **kw)
            record.update(model_dtype=str(policy.model.dtype), model_device=str(policy.model.device))
            # Force every completion to T tokens: an EOS id no sampler can emit (bench/common.py).
            policy.tokens = dataclasses.replace(policy.tokens, eos_token_ids=(never_sampled_eos(policy.model),))
            counter.attach(policy.model.model.visual, "policy")
            if policy.reference is not None:
                counter.attach(policy.reference.model.visual, "reference")
            return policy

        return build_policy

    def sample_rollouts_wrapper(original):
        return _timed_rollout(original, record, counter)

    def metrics_logger_wrapper(original):
        class TimedMetricsLogger(original):
            def log(self, step, metrics):
                record["step_end"].append(_now())
                record["completion_length_mean"].append(float(metrics["completion_length_mean"]))
                counter.step = step
                out = super().log(step, metrics)
                if step % args.num_iterations == 0:  # the generation batch's last optimizer step
                    _end_batch(record, gate)
                return out

        return TimedMetricsLogger

    # The loop's helpers are patched where the loop looks them up (the module that imported
    # them by name), which has moved between files as the loop evolved: patch every holder.
    patch_everywhere("build_policy", build_policy_wrapper, ("grpo.grpo_loop", "grpo.runtime.run", "grpo.runtime.policy"))
    patch_everywhere("sample_rollouts", sample_rollouts_wrapper, ("grpo.grpo_loop", "grpo.runtime.run"))
    patch_everywhere("MetricsLogger", metrics_logger_wrapper, ("grpo.grpo_loop", "grpo.runtime.run"))

    # The collator runs once per generation batch, first thing: the gate goes there.
    original_collate = data.collators.GRPOCollator.__call__

    def collate(self, examples):
        gate.wait()
        return original_collate(self, examples)

    data.collators.GRPOCollator.__call__ = collate
    loop.train_grpo(config)
    record["vision"] = counter.as_json()
    return record


def trl_dataset(args):
    """The prompts our loop draws, in the order it draws them, in TRL's conversational format."""
    import datasets

    from data.index_stream import IndexStream
    from data.loading import load_prompt_dataset
    from data.prompts import build_messages
    from grpo.config import parse_config
    from models.loading import load_policy

    config = parse_config(our_argv(args, tempfile.mkdtemp()))
    if args.device == "cpu":
        _, processor = load_policy(args.model_dir)  # as measured for docs/benchmarks.md
    else:
        # The same processor without loading the weights (load_policy would put 3.75 B float32
        # parameters in host memory just to read the tokenizer): what load_policy does to it.
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(args.model_dir)
        processor.tokenizer.padding_side = "left"
    dataset, _ = load_prompt_dataset(config, processor)
    order = IndexStream(len(dataset), seed=config.train.seed).take(args.num_prompts * args.num_batches)
    rows = []
    for i in order:
        example = dataset[i]
        rows.append({
            "prompt": build_messages(example, system_prompt=config.data.system_prompt_text),
            "images": list(example["images"]),
            "answer": str(example["answer"]),
        })
    return datasets.Dataset.from_list(rows)


def _texts(completions) -> list[str]:
    return [c[0]["content"] if isinstance(c, list) else c for c in completions]


def format_for_trl(prompts, completions, answer, **kwargs):
    """grpo.reward_functions.format_reward in TRL's reward signature (conversational completions)."""
    from grpo.reward_functions import format_reward

    return format_reward(_texts(completions), answer)


def count_accuracy_for_trl(prompts, completions, answer, **kwargs):
    """grpo.reward_functions.count_accuracy_reward in TRL's reward signature."""
    from grpo.reward_functions import count_accuracy_reward

    return count_accuracy_reward(_texts(completions), answer)


def run_trl(args, output_dir: str, gate: Gate) -> dict:
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    dataset = trl_dataset(args)
    T = args.max_completion_length
    rows = args.num_prompts * args.group_size
    trl_args = GRPOConfig(
        output_dir=output_dir, use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16", fp16=False, seed=0,
        gradient_checkpointing=args.trl_gradient_checkpointing, report_to="none",
        logging_steps=1, save_strategy="no", dataloader_num_workers=0, log_completions=False,
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=rows // args.micro_batch_size,
        num_generations=args.group_size, max_completion_length=T, shuffle_dataset=False,
        num_iterations=args.num_iterations, beta=args.beta, loss_type="grpo", scale_rewards="group",
        epsilon=0.2, temperature=1.0, top_p=1.0, top_k=0, learning_rate=args.learning_rate, lr_scheduler_type="constant",
        weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=1.0,
        max_steps=args.num_batches * args.num_iterations, remove_unused_columns=False,
        generation_kwargs={"min_new_tokens": T},  # EOS logits -> -inf: exactly T tokens
        model_init_kwargs={"dtype": args.dtype},
    )
    trainer = GRPOTrainer(model=args.model_dir, reward_funcs=[format_for_trl, count_accuracy_for_trl], args=trl_args,
                          train_dataset=dataset)
    counter = VisionCounter()
    counter.attach(trainer.model.model.visual, "policy")
    if getattr(trainer, "ref_model", None) is not None:
        counter.attach(trainer.ref_model.model.visual, "reference")
    record = {"step_end": [], "completion_length_mean": [], "rss_train_start_mb": None, "rollout_seconds": [],
              "batch_end": [], "batch_end_cpu": [], "waited": [], "gpu_train_start_mb": None,
              "trl_version": __import__("trl").__version__, "model_dtype": str(trainer.model.dtype),
              "model_device": str(trainer.model.device)}

    trainer._generate_single_turn = _timed_rollout(trainer._generate_single_turn, record, counter)

    # TRL prepares a new generation batch in _generate_and_score_completions: the gate goes there.
    original_generate_and_score = trainer._generate_and_score_completions

    def generate_and_score(*a, **kw):
        gate.wait()
        return original_generate_and_score(*a, **kw)

    trainer._generate_and_score_completions = generate_and_score

    class Timer(transformers.TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            record["step_end"].append(_now())
            counter.step = state.global_step
            if state.global_step % args.num_iterations == 0:
                _end_batch(record, gate)
            return control

    trainer.add_callback(Timer())
    trainer.train()
    record["completion_length_mean"] = [
        entry["completions/mean_length"] for entry in trainer.state.log_history if "completions/mean_length" in entry
    ]
    record["vision"] = counter.as_json()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trainer", choices=("ours", "trl"), required=True)
    parser.add_argument("--model_dir", required=True, help="a save_pretrained Qwen2.5-VL folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num_prompts", type=int, default=4, help="B")
    parser.add_argument("--group_size", type=int, default=8, help="G")
    parser.add_argument("--micro_batch_size", type=int, default=8)
    parser.add_argument("--max_completion_length", type=int, default=32, help="T")
    parser.add_argument("--num_iterations", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-5,
                        help="AdamW lr of both trainers (0 still runs the whole update; see grpo_step_vs_trl.py)")
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--num_batches", type=int, default=3, help="generation batches (the first is a warm-up)")
    parser.add_argument("--num_examples", type=int, default=64)
    parser.add_argument("--freeze_policy", default="full", help="ours only: full | language (vision frozen)")
    parser.add_argument("--trl_gradient_checkpointing", action="store_true",
                        help="TRL only: its default (True); off by default here to match ours")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gate_fds", default=None, help="READ_FD,WRITE_FD inherited from the parent (see Gate)")
    args = parser.parse_args()

    import torch

    global SYNC_CUDA
    SYNC_CUDA = args.device == "cuda"
    if SYNC_CUDA and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as output_dir:
        gate = Gate(args.gate_fds)
        record = (run_ours if args.trainer == "ours" else run_trl)(args, output_dir, gate)
    record.update(trainer=args.trainer, peak_rss_mb=_proc_mb("VmHWM"), machine=machine_info(),
                  setting=vars(args), pid=os.getpid(), gpu_peak_allocated_mb=_gpu_mb("max_memory_allocated"),
                  gpu_peak_reserved_mb=_gpu_mb("max_memory_reserved"))
    if SYNC_CUDA:
        record["gpu"] = torch.cuda.get_device_name()
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
