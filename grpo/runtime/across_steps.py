"""The two options whose state lives across optimizer steps: the entropy bonus's adaptive
coefficient and the moving reference. One object, so the loop stays the loop.

    --use_adaptive_entropy: c moves by --entropy_coef_delta toward keeping the policy's entropy
        at --entropy_target (Skywork-OR1, arXiv 2505.22312; the rule: grpo/entropy_bonus.py)
    --sync_ref_model: pi_ref <- alpha * pi_theta + (1 - alpha) * pi_ref every
        --ref_model_sync_steps optimizer steps (TR-DPO, arXiv 2404.09656; grpo/reference_sync.py)

Both states go into every checkpoint (`checkpoint_extra`) and come back on resume (`__init__`),
so a resumed run repeats the uninterrupted one (tests/test_resume.py). With both options off
(the default) every method is a no-op: `entropy_coef()` is None and nothing is saved.
"""

from __future__ import annotations

from grpo.config import GRPOArguments
from grpo.entropy_bonus import EntropyCoefficient, adapted_coefficient
from grpo.reference_sync import is_sync_step
from grpo.runtime.reference_sync import reference_state, restore_reference, sync_reference


class AcrossSteps:
    """The entropy coefficient and the moved reference of one run, restored from `extra` on resume."""

    def __init__(self, gargs: GRPOArguments, policy, extra: dict):
        self.gargs, self.policy = gargs, policy
        self.entropy_control = EntropyCoefficient(gargs.entropy_coef)
        if gargs.use_adaptive_entropy and "entropy_control" in extra:
            self.entropy_control = EntropyCoefficient.from_state_dict(extra["entropy_control"])
        if "synced_reference" in extra and policy.reference is not None:
            restore_reference(policy, extra["synced_reference"])

    def entropy_coef(self) -> float | None:
        """The bonus's coefficient for the coming step (adaptive control's c_applied); None without a bonus."""
        if not self.gargs.entropy_bonus_enabled:
            return None
        return self.entropy_control.applied(adaptive=self.gargs.use_adaptive_entropy, target=self.gargs.entropy_target)

    def after_step(self, step: int, metrics: dict[str, float], coef_applied: float | None) -> dict[str, float]:
        """After optimizer step `step`: adapt the coefficient for the next step, move the reference
        on a sync step. Returns the metrics to log (TRL's names)."""
        gargs, logged = self.gargs, {}
        if gargs.use_adaptive_entropy:  # Skywork-OR1's controller, for the next step
            measured = metrics["entropy_bonus_mean_entropy"]
            coef = adapted_coefficient(
                self.entropy_control.coef, measured, target=gargs.entropy_target, delta=gargs.entropy_coef_delta,
                low=gargs.entropy_coef_min, high=gargs.entropy_coef_max,
            )  # fmt: skip
            self.entropy_control = EntropyCoefficient(coef, last_entropy=measured)
        if gargs.entropy_bonus_enabled:  # TRL's entropy_coef (after the update), and this step's
            logged |= {"entropy_coef": self.entropy_control.coef, "entropy_coef_applied": coef_applied}
        if gargs.sync_ref_model:  # TR-DPO: the reference moves after the optimizer step
            synced = is_sync_step(step, gargs.ref_model_sync_steps)
            if synced:
                sync_reference(self.policy, gargs.ref_model_mixup_alpha)
            logged["ref_model_synced"] = float(synced)
        return logged

    def checkpoint_extra(self) -> dict:
        """What a checkpoint keeps of them (every rank calls it: under --fsdp the weights are gathered)."""
        extra = {}
        if self.gargs.use_adaptive_entropy:
            extra["entropy_control"] = self.entropy_control.state_dict()
        if self.gargs.sync_ref_model:
            extra["synced_reference"] = reference_state(self.policy)
        return extra
