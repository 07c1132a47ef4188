"""The layers of grpo/ (docs/architecture.md): imports go one way, from the loops down to the math.

    math -> rewards -> engine -> config -> runtime -> dynamic sampling, validation -> loops -> demo

A module may import its own layer and the layers below it, never one above: the math never sees a
model, an optimizer or torch.distributed; the engine never sees the runtime; nothing below the
loops imports a loop. Lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYERS = [
    ("math", ["grpo", "grpo.logprobs", "grpo.advantages", "grpo.kl", "grpo.sampler_correction",
              "grpo.loss", "grpo.objectives", "grpo.masks", "grpo.token_selection", "grpo.entropy_bonus", "grpo.reference_sync"]),
    ("rewards", ["grpo.reward_functions", "grpo.rewards"]),
    ("engine", ["grpo.engine"]),
    ("config", ["grpo.config"]),
    ("runtime", ["grpo.runtime"]),
    ("algorithm on the runtime", ["grpo.dynamic_sampling", "grpo.validation"]),
    ("loops", ["grpo.grpo_loop", "grpo.sft_loop", "grpo.minimal"]),
    ("demo", ["grpo.demo", "grpo.plot"]),
]  # fmt: skip
FORBIDDEN_IN_MATH = ("torch.distributed", "transformers", "models", "torch.optim")


def _layer(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "grpo" and module.startswith(prefix + ".")):
                best = rank
    if best is None:
        raise AssertionError(f"{module} has no layer in tests/test_layers.py: add it (and to docs/architecture.md)")
    return best


def _modules():
    for path in sorted((REPO / "grpo").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_every_grpo_module_imports_only_its_layer_and_below():
    wrong = []
    for name, path in _modules():
        own = _layer(name)
        for imported in _imports(path):
            if imported.startswith("grpo.") and _layer(imported) > own:
                wrong.append(f"{name} ({LAYERS[own][0]}) imports {imported} ({LAYERS[_layer(imported)][0]})")
            if own == 0 and imported.startswith(FORBIDDEN_IN_MATH):
                wrong.append(f"{name} (math) imports {imported}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_check_sees_a_violation():
    # The engine importing the runtime would be one: make sure _layer ranks them that way round.
    assert _layer("grpo.engine.rollout") < _layer("grpo.runtime.run") < _layer("grpo.grpo_loop")
    assert _layer("grpo.loss") == 0 and _layer("grpo") == 0 and _layer("grpo.runtime") == _layer("grpo.runtime.fsdp")
