"""The runtime: the life of a training job around the algorithm ("try not to modify").

    run.py            start, resume, the optimizer step (all-reduce, clip, AdamW), save, finish;
                      the SIGTERM/SIGINT stop request and the non-finite-step guard
    policy.py         the policy and its frozen reference: loading, freezing, LoRA state, FSDP views
    optimizer.py      AdamW and the learning-rate schedule
    device.py         seeding and the device
    distributed.py    torchrun set-up, the few collectives, gradient averaging
    fsdp.py           --fsdp: FSDP2 sharding and full-state checkpoints
    checkpoint.py     atomic checkpoints and the resume state
    starting_point.py which model a run started from (its KL reference)
    run_lock.py       one live run per output_dir
    launch.py         `python -m grpo.runtime.launch`: torchrun for preemptible jobs
    preflight.py      one micro-batch at the longest input before step 1
    start_checks.py   flag checks before the model loads (exit 2)
    metrics.py        metrics.jsonl and samples.log
    reporting.py      the console metrics line, TensorBoard and W&B

The loops (grpo/grpo_loop.py, grpo/sft_loop.py) call these; the math never does.
"""
