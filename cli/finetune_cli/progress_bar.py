"""The live progress bar `finetune run` draws in a terminal from the trainer's events."""

from __future__ import annotations

from typing import TextIO

from finetune_api.events import parse_event_line


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def render_bar(event: dict, width: int = 30) -> str:
    step, total = event.get("step", 0), event.get("totalSteps") or 0
    fraction = min(step / total, 1.0) if total else 0.0
    filled = int(round(fraction * width))
    parts = [f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{total} {fraction * 100:3.0f}%"]
    if event.get("loss") is not None:
        parts.append(f"loss {event['loss']:.4f}")
    if event.get("tokensPerSecond"):
        parts.append(f"{event['tokensPerSecond']:,.0f} tok/s")
    parts.append(f"ETA {_duration(event.get('etaSeconds'))}")
    return "  ".join(parts)


class ProgressBar:
    """Progress events redraw one line; every other line is printed above it."""

    def __init__(self, out: TextIO):
        self.out = out
        self.drawn = False

    def _clear(self) -> None:
        if self.drawn:
            self.out.write("\r\033[K")
            self.drawn = False

    def feed(self, line: str) -> None:
        event = parse_event_line(line)
        if event and event["event"] == "progress":
            self._clear()
            self.out.write(render_bar(event))
            self.drawn = True
        elif event and event["event"] == "checkpoint":
            self._clear()
            self.out.write(f"checkpoint at step {event.get('step')}: {event.get('uri')}\n")
        elif event and event["event"] == "started":
            self._clear()
            resumed = event.get("resumedFromStep")
            self.out.write(f"training {event.get('totalSteps')} steps on "
                           f"{event.get('workers')} worker(s), {event.get('strategy')}"
                           + (f", resumed from step {resumed}" if resumed else "") + "\n")
        elif event is None and line.strip():
            self._clear()
            self.out.write(line if line.endswith("\n") else line + "\n")
        elif event:  # completed / failed stay in the scrollback as they are
            self._clear()
            self.out.write(line if line.endswith("\n") else line + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.drawn:
            self.out.write("\n")
            self.drawn = False
        self.out.flush()
