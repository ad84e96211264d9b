"""Refresh the "Latest figures" section of bench/README.md from bench/results/*.json.

    python -m bench._readme

Each benchmark's block shows the exact command, the date, the machine and the versions its
results file recorded, then its table: the README never holds a figure the results do not.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
START, END = "<!-- figures:start -->", "<!-- figures:end -->"
ORDER = ["operator_scale", "operator_scale_real", "trainer_overhead", "checkpoint_io", "lora_vs_full",
         "model_memory", "gpu_throughput", "gpu_throughput_smoke", "gpu_qlora"]


def block(doc: dict) -> str:
    m, v = doc["machine"], doc["versions"]
    vers = ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "ray", "deepspeed", "kopf", "kmock") if v.get(k))
    return "\n".join([
        f"### {doc['benchmark']}",
        "",
        f"- command: `{doc['command']}`",
        f"- date: {doc['date']}",
        f"- machine: {m['cpu_model']}, {m['cpu_count']} CPUs, {m['mem_total_gb']} GB, {m['platform']}"
        f" (load average at start {', '.join(f'{x:.1f}' for x in m['loadavg_at_start'])})",
        f"- versions: {vers}",
        *([f"- code: commit {doc['git']['head'][:10]} with {len(doc['git']['uncommitted'])} uncommitted "
           f"files outside bench/ (listed in the results file)"] if doc.get("git") else []),
        "",
        "```",
        doc.get("table", "").rstrip(),
        "```",
        "",
    ])


def main() -> None:
    readme = HERE / "README.md"
    text = readme.read_text()
    docs = {}
    for path in sorted((HERE / "results").glob("*.json")):
        doc = json.loads(path.read_text())
        docs[path.stem] = doc
    names = [n for n in ORDER if n in docs] + sorted(n for n in docs if n not in ORDER)
    figures = "\n".join(block(docs[n]) for n in names)
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{START}\n{figures}\n{END}{tail}")
    print(f"{readme}: {len(names)} result blocks")


if __name__ == "__main__":
    main()
