"""What every benchmark records about the machine it ran on (stdlib only: runs on a bare GPU box too)."""

import platform
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_docs_section(section: str, text: str, doc: Path) -> None:
    """Replace this benchmark's own section of docs/BENCHMARKS.md (up to the next "## " heading), or append it."""
    old = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    if section in old:
        head, rest = old.split(section, 1)
        nxt = rest.find("\n## ")
        old = head.rstrip("\n") + "\n\n" + (rest[nxt + 1:] if nxt >= 0 else "")
    doc.write_text(old.rstrip("\n") + "\n\n" + text, encoding="utf-8")


def publish(section: str, lines: list[str], write: bool) -> None:
    """Print a benchmark's markdown section; with ``write``, replace it in docs/BENCHMARKS.md."""
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        write_docs_section(section, text, Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md")


def best_of(fn, repeat: int) -> tuple[float, object]:
    """The fastest of ``repeat`` calls of ``fn`` (seconds) and its last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out
