"""The engine: everything that talks to the Qwen2.5-VL model (skippable on a first read).

    forward.py           the model forward every pass uses: the prompt prefill and the scoring
                         forwards, logits only for the completion positions; `GenerationBatch`,
                         one generation batch's inputs, shared by the old, reference and policy forwards
    inputs.py            the inputs built by hand: images encoded once and copied to their rows,
                         explicit 3-D (mRoPE) positions, inputs_embeds
    hf_compat.py         what differs between transformers versions (cache keyword, wrappers)
    rollout.py           the hand-written sampler: prefill once per prompt, KV cache copied G ways,
                         the decode loop, the completion mask (through the first EOS)
    hf_generate.py       the same rollouts through HF's `generate` on G copies: the twin tests and
                         benchmarks compare the sampler with
    sampling.py          one token per row: temperature, top-k, top-p, greedy, inverse CDF on CPU
    decoders.py          the decode step: HF's growing cache, or fixed buffers replayed from a CUDA graph

The algorithm (grpo/*.py) calls these; they never import the loops or the runtime.
"""
