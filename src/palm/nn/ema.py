"""The weight average of a training run (``train.ema``)."""

from __future__ import annotations

import paddle


class WeightEMA:
    """Exponential moving average of a network's weights and batch-norm statistics.

    ``decay`` applies per optimizer step, ramped up as ``min(decay, (1 + t) / (10 + t))`` so
    that the first steps do not keep the random initial weights. The averaged network is a
    second, eager copy of the architecture (``shadow``), used for the holdout and saved.
    """

    def __init__(self, model, shadow, decay: float):
        self.shadow, self.decay, self.steps = shadow, float(decay), 0
        self.shadow.set_state_dict(model.state_dict())
        self.shadow.eval()
        # (average, current) tensor pairs, looked up once: update() runs after every step
        current = model.state_dict()
        self.pairs = [(avg, current[name]) for name, avg in shadow.state_dict().items()]

    def update(self) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        with paddle.no_grad():
            for avg, cur in self.pairs:
                if paddle.is_floating_point(avg):
                    avg.set_value(avg * d + cur * (1 - d))
                else:
                    avg.set_value(cur)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "weights": self.shadow.state_dict()}

    def set_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.shadow.set_state_dict(state["weights"])
