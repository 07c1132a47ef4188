"""The offline demo: does GRPO beat simply training SFT for longer? (`python -m grpo.demo`)

    pipeline.py   the stages, driven through the real command lines (train.py, torchrun, eval.py)
    report.py     report.md, demo_curves.png and the summary, read from what the runs wrote

docs/demo.md describes the set-up, the protocol and the results.
"""
