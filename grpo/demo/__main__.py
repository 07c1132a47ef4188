"""`python -m grpo.demo`: see grpo/demo/pipeline.py."""

from grpo.demo.pipeline import main

if __name__ == "__main__":
    main()
