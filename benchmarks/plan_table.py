"""The "which card" tables of docs/memory-plan.md: the plan for Qwen-Image-Edit-2509 (published config,
nothing downloaded) at 512 and 1024 px with 1 and 3 source images, every mode on 1 GPU and on 8 (FSDP).

    python benchmarks/plan_table.py [--lora_rank 64] [--text_tokens 512] [--gpus 8]

Planned, not measured: the activations are counted on one real-width block on this CPU
(see pipeline/train/engine/activations.py); ``benchmarks/gpu_check.py`` prints the measured peak
beside the plan's on a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from pipeline.families.qwen_edit import DEFAULT_LORA_TARGETS
    from pipeline.train.engine.plan import PlanRequest, build_on_meta, card_table, read_configs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--text_tokens", type=int, default=512)
    p.add_argument("--gpus", type=int, default=8)
    args = p.parse_args()
    started = time.perf_counter()
    transformer, vae = build_on_meta(*read_configs("qwen-image-edit-2509"))
    configs = [(size, sources) for size in (512, 1024) for sources in (1, 3)]
    tables = {}
    for size, sources in configs:
        request = PlanRequest(
            lora=True, lora_rank=args.lora_rank, lora_targets=DEFAULT_LORA_TARGETS,
            mixed_precision="bf16", batch_size=1, image_sample_size=size, num_sources=sources,
            text_tokens=args.text_tokens, vae_mini_batch=1,
        )  # fmt: skip
        tables[size, sources] = card_table(transformer, vae, request, args.gpus)
    head = ["mode", "GPUs", "checkpointing", *(f"{size} px, {n} src" for size, n in configs), "host GiB"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for i, row in enumerate(tables[configs[0]]):
        cells = [row["mode"], str(row["gpus"]) + (" (FSDP)" if row["sharding"] == "FSDP" else ""),
                 "on" if row["gradient_checkpointing"] else "off"]  # fmt: skip
        for config in configs:
            r = tables[config][i]
            card = f"{min(r['fits'])} GB" if r["fits"] else "none"
            cells.append(f"{r['gib_per_gpu']:.1f} ({card})")
        host = max(tables[c][i]["host_gib_per_process"] for c in configs)
        cells.append(f"{host:.0f}" if host else "—")
        print("| " + " | ".join(cells) + " |")
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
