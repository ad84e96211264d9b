"""The one live line `finetune run` draws in a terminal from the trainer's progress events."""

from __future__ import annotations

from typing import TextIO


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def eval_loss_of(event: dict) -> float | None:
    """An event's eval loss, if it has one (`evalLoss`, or `eval_loss`)."""
    value = event.get("evalLoss", event.get("eval_loss"))
    return value if isinstance(value, (int, float)) else None


def render_bar(event: dict, width: int = 30, eval_loss: float | None = None) -> str:
    step, total = event.get("step", 0), event.get("totalSteps") or 0
    fraction = min(step / total, 1.0) if total else 0.0
    filled = int(round(fraction * width))
    parts = [f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{total} {fraction * 100:3.0f}%"]
    if event.get("loss") is not None:
        parts.append(f"loss {event['loss']:.4f}")
    if eval_loss is not None:
        parts.append(f"eval loss {eval_loss:.4f}")
    if event.get("tokensPerSecond"):
        parts.append(f"{event['tokensPerSecond']:,.0f} tok/s")
    parts.append(f"ETA {_duration(event.get('etaSeconds'))}")
    return "  ".join(parts)


class ProgressBar:
    """Progress events redraw one line in place; other text is printed above it. The eval
    loss, once an event carried one, stays on the bar."""

    def __init__(self, out: TextIO):
        self.out = out
        self.drawn = False
        self.eval_loss: float | None = None
        self.last: dict | None = None

    def _clear(self) -> None:
        if self.drawn:
            self.out.write("\r\033[K")
            self.drawn = False

    def draw(self, event: dict) -> None:
        self.last = event
        self._clear()
        self.out.write(render_bar(event, eval_loss=self.eval_loss))
        self.drawn = True
        self.out.flush()

    def note_eval_loss(self, value: float) -> None:
        self.eval_loss = value
        if self.last is not None:
            self.draw(self.last)

    def print(self, text: str) -> None:
        """A line above the bar (which is drawn again at the next progress event)."""
        self._clear()
        self.out.write(text.rstrip("\n") + "\n")
        if self.last is not None:
            self.out.write(render_bar(self.last, eval_loss=self.eval_loss))
            self.drawn = True
        self.out.flush()

    def close(self) -> None:
        if self.drawn:
            self.out.write("\n")
            self.drawn = False
        self.last = None
        self.out.flush()
