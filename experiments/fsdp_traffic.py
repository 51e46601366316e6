"""What crosses the network per step on an `fsdp` mesh, read from the compiled program:
the main job's KD step (and a layer-level blockwise step) for the Llama-3.2-1B and
Llama-3.1-8B shapes on fsdp=8, compiled on abstract shapes (no weights).

    python experiments/fsdp_traffic.py       # about 2 minutes on 2 CPU cores

Per device and step: the bytes of every collective over `fsdp`, each counted as many
times as the loops around it run (`blockdistill.testing.hlo_collectives`, `trips`),
against the bytes of one copy of the student's and the teacher's parameters.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import blockdistill as bd  # noqa: E402
from blockdistill.interop.folders import read_model_config
from blockdistill.app.plan import format_bytes, plan_memory
from blockdistill.distill.prune import student_config_for
from blockdistill.testing import hlo_collectives  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = pathlib.Path(__file__).resolve().parent / "fsdp_traffic.json"
RECIPES = {"KD (the main job)": dict(blockwise_weight=0.0),
           "layer-level blockwise (fused)": dict(blockwise_weight=1.0, inject_at="layer")}


def main() -> int:
    mesh = bd.make_mesh("fsdp=8")
    rows = []
    for shape in ("llama-3.2-1b", "llama-3.1-8b"):
        teacher = read_model_config(ROOT / "configs" / "shapes" / f"{shape}.json").replace(
            dtype="bfloat16", remat="full")
        student = student_config_for(teacher, bd.StudentConfig(mlp_ratio=0.5))
        for name, recipe in RECIPES.items():
            objective = bd.DistillationObjective(**recipe, logit_chunk=256)
            plan = plan_memory(teacher, student, objective, batch_size=8, seq_len=1024, mesh=mesh, hlo=True)
            traffic: dict[str, int] = {}
            for c in hlo_collectives(plan["hlo"], mesh):
                if "fsdp" in c.axes:
                    traffic[c.kind] = traffic.get(c.kind, 0) + c.bytes * c.trips
            rows.append({"shape": shape, "recipe": name, "traffic": traffic,
                         "student_params_bytes": plan["student_params"] * 8,
                         "teacher_params_bytes": plan["teacher_params"] * 8})
            print(shape, name, {k: format_bytes(v) for k, v in traffic.items()},
                  "params: student", format_bytes(plan["student_params"] * 8), "teacher",
                  format_bytes(plan["teacher_params"] * 8), flush=True)
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
