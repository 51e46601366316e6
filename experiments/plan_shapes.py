"""The memory planner's table for docs/scaling.md: Llama-3.2-1B, Llama-3.1-8B and
Llama-3.1-70B shapes distilled into the main job's student (half the MLP width, logit KD)
on 1, 8 and 64 devices, from `blockdistill plan` (no weights are read).

    python experiments/plan_shapes.py            # about 5 minutes on 2 CPU cores

Every case compiles the real step for the planning machine's backend: the parameter,
optimizer and batch bytes are exact; the temporaries are the CPU compiler's.
"""

import json
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "scaling.md"
RESULTS = pathlib.Path(__file__).resolve().parent / "plan_shapes.json"
BEGIN = "<!-- plan-table:begin (written by experiments/plan_shapes.py; do not edit) -->"
END = "<!-- plan-table:end -->"
SHAPES = ("llama-3.2-1b", "llama-3.1-8b", "llama-3.1-70b")
DEVICES = (1, 8, 64)
SEQ_LEN = 1024
DEVICE_MEMORY = "80GB"
FIELDS = ("teacher parameters", "student parameters", "optimizer state", "temporaries", "total")


def plan(shape: str, devices: int) -> dict:
    batch = max(8, devices)
    args = ["plan", "--teacher", f"configs/shapes/{shape}.json", "--batch-size", str(batch), "--seq-len",
            str(SEQ_LEN), "--dtype", "bfloat16", "--remat", "full", "--logit-chunk", "256",
            "--device-memory", DEVICE_MEMORY]
    if devices > 1:
        args += ["--mesh", f"fsdp={devices}"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "blockdistill", *args], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    seconds = time.perf_counter() - start
    row = {"shape": shape, "devices": devices, "batch": batch, "mesh": f"fsdp={devices}" if devices > 1 else "-",
           "seconds": seconds, "command": "blockdistill " + " ".join(args)}
    for field in FIELDS:
        match = re.search(rf"^\s*{field}\s+([0-9.]+ \w+)", done.stdout, re.MULTILINE)
        row[field] = match.group(1)
    row["fits"] = "DOES NOT FIT" not in done.stdout
    return row


def table(rows: list[dict]) -> str:
    lines = ["| teacher | devices (mesh) | global batch | teacher params | student params | optimizer | "
             "temporaries | total per device | fits 80 GB | planned in |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['devices']} ({r['mesh']}) | {r['batch']} x {SEQ_LEN} | "
                     f"{r['teacher parameters']} | {r['student parameters']} | {r['optimizer state']} | "
                     f"{r['temporaries']} | {r['total']} | {'yes' if r['fits'] else '**no**'} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def main() -> int:
    rows = [plan(shape, devices) for shape in SHAPES for devices in DEVICES]
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    text = PAGE.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    PAGE.write_text(f"{head}{BEGIN}\n\n{table(rows)}\n\n{END}{tail}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
