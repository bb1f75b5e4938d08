"""Optimizer settings → an optax transformation (AdamW, warmup + constant/cosine, grad clipping)."""

import equinox as eqx
import optax

SCHEDULES = ("constant", "cosine")


class Optimizer(eqx.Module):
    """AdamW with linear warmup, an optional cosine decay and global-norm clipping.

    **Fields:**

    - `learning_rate`: peak learning rate.
    - `warmup_steps`: linear warmup from 0 (optimizer updates, not RL steps).
    - `schedule`: `"constant"` or `"cosine"` (decays to 10% over `decay_steps`).
    - `decay_steps`: length of the cosine decay.
    - `weight_decay`, `b1`, `b2`, `eps`: AdamW.
    - `grad_clip`: global gradient-norm clip (0: off).
    """

    learning_rate: float = 1e-6
    warmup_steps: int = 0
    schedule: str = "constant"
    decay_steps: int = 1000
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0

    def __check_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}")

    def learning_rate_schedule(self) -> optax.Schedule:
        """The learning rate as a function of the optimizer's update count.

        **Returns:**

        An optax schedule.
        """
        warmup = max(self.warmup_steps, 1)
        if self.schedule == "cosine":
            return optax.warmup_cosine_decay_schedule(
                0.0 if self.warmup_steps else self.learning_rate,
                self.learning_rate,
                warmup,
                warmup + self.decay_steps,
                end_value=0.1 * self.learning_rate,
            )
        return optax.linear_schedule(
            0.0 if self.warmup_steps else self.learning_rate, self.learning_rate, warmup
        )

    def transform(self) -> optax.GradientTransformation:
        """The optax transformation.

        **Returns:**

        Gradient clipping (when on) followed by AdamW with the schedule.
        """
        adamw = optax.adamw(
            self.learning_rate_schedule(),
            b1=self.b1,
            b2=self.b2,
            eps=self.eps,
            weight_decay=self.weight_decay,
        )
        if self.grad_clip > 0:
            return optax.chain(optax.clip_by_global_norm(self.grad_clip), adamw)
        return adamw
