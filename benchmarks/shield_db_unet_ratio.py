"""SPELL over 1M shields x 4096 dims inside a real ComfyUI, in one process: what the search costs per model
evaluation, as a ratio to that evaluation (issue #18 item 2: search + verify <= 2% of a model evaluation at 1M
shields for a batch of 8, on the device the model runs on; the CPU here).

Needs the 1M database of ``shield_db_side_by_side build`` and a ComfyUI checkout, run with that ComfyUI's Python:

    COMFYUI_PATH=<ComfyUI> nice -n 10 <its python> -m benchmarks.shield_db_unet_ratio --steps 3 --repeats 2

Two measurements, one process, one model (ComfyUI's own ``UNetModel`` in the SD1.5 shape, random weights, fp32):

- ``runs``: ``KSampler`` (euler, cfg 7, batch 8 of 4x32x32 latents = the shields' shape, cond and uncond in one
  batch of 16) without SPELL and with ``Apply SPELL`` repelling from the 1M database (``Shield Set`` over
  ``DatabaseShields``, the path the Shield Set Loader builds), interleaved; the ratio of run times, and the time
  spent inside the database's ``within`` (once per model evaluation) and ``nearest`` (once per run, the report)
  during the SPELL runs. The random model's predictions are far from every shield, so the screen passes few rows.
- ``search``: the database's ``within`` (the call SPELL makes once per model evaluation) on queries next to stored
  shields (``shield_db_million.queries``: each ball holds its near-duplicate group, ~3,500 candidates per batch),
  timed after the runs in the same process, divided by the plain run's time per evaluation.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import numpy as np
import torch

from benchmarks import comfy_host as host
from benchmarks import shield_db_million as million
from benchmarks.shield_db_side_by_side import RESULTS, timed

BATCH = 8
CFG = 7.0


def open_shield_set():
    """The 1M database as the Shield Set Loader hands it to SPELL (the pack's own modules, as ComfyUI loaded them)."""
    database = host.pack_submodule("shield_db.database")
    source_mod = host.pack_submodule("shield_db.source")
    shield_set = host.pack_submodule("nodes.shield_set")
    snapshot = database.ShieldDatabase(million.ROOT / "db").snapshot(check_sha=False)
    source = source_mod.DatabaseShields(snapshot)
    snapshot.wait_held()  # the steady state: latents held in RAM up to the budget
    source.snapshot.index.cascade()
    return shield_set.ShieldSet(source, name="1M synthetic"), source


def instrument(source, name: str, calls: dict) -> None:
    """Time every call of ``source.<name>`` (wall s, CPU s) into ``calls[name]``."""
    method = getattr(source, name)
    calls[name] = []

    def timed_call(*args, **kwargs):
        out, wall, cpu = timed(method, *args, **kwargs)
        calls[name].append([wall, cpu])
        return out
    setattr(source, name, timed_call)


def spell_model(model, shields, radius_rms: float):
    spell_nodes = host.pack_submodule("nodes.spell_nodes")
    return spell_nodes.ApplySpell().apply(
        model, radius=radius_rms, overcompensation=1.0, intra_batch=False, history=False, history_name="ratio",
        history_size=8, start_percent=0.0, end_percent=1.0, exact=False, shield_set=shields)[0]


def runs(nodes, variants: dict, steps: int, repeats: int) -> dict:
    latent = {"samples": torch.zeros(BATCH, *million.ITEM_SHAPE)}
    pos, neg = host.conditioning(1, 77, 768), host.conditioning(2, 77, 768)
    out = {name: {"wall_s": [], "cpu_s": []} for name in variants}
    for r in range(repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            _, wall, cpu = timed(nodes.KSampler().sample, variants[name], 0, steps, CFG, "euler", "normal", pos, neg,
                                 latent)
            out[name]["wall_s"].append(wall)
            out[name]["cpu_s"].append(cpu)
            print(f"  repeat {r} {name}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    return out


def search(source, reps: int) -> dict:
    rng = np.random.default_rng(123)
    out = {"wall_s": [], "cpu_s": [], "hits": []}
    for _ in range(reps):
        q = torch.from_numpy(million.queries(source.snapshot, rng))
        hits, wall, cpu = timed(source.within, q, million.RADIUS)
        out["wall_s"].append(wall)
        out["cpu_s"].append(cpu)
        out["hits"].append(int(hits.shape[0]))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--search-reps", type=int, default=7)
    args = parser.parse_args()
    nodes = host.boot_comfy()
    shields, source = open_shield_set()
    model = host.random_model(unet_config=host.sd15_unet_config())
    scale = model.model.latent_format.scale_factor  # model space = VAE latent x scale; shields are in VAE space
    radius_rms = million.RADIUS * scale / np.sqrt(million.DIM)
    variants = {"plain": model, "spell_1M": spell_model(model, shields, radius_rms)}
    result = {"rows": len(source), "dim": million.DIM, "batch": BATCH, "steps": args.steps, "cfg": CFG,
              "threads": torch.get_num_threads(), "radius_vae_space": million.RADIUS, "radius_rms": radius_rms,
              "load_start": os.getloadavg()}
    calls = {}
    for name in ("within", "nearest"):
        instrument(source, name, calls)
    result["runs"] = runs(nodes, variants, args.steps, args.repeats)
    result["calls_in_spell_runs"] = {k: list(v) for k, v in calls.items()}
    result["search"] = search(source, args.search_reps)
    result["load_end"] = os.getloadavg()
    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in result["runs"].items()}
    per_eval = {k: med["plain"][k] / args.steps for k in ("wall_s", "cpu_s")}
    result["summary"] = {
        "run_ratio_wall": med["spell_1M"]["wall_s"] / med["plain"]["wall_s"],
        "run_ratio_cpu": med["spell_1M"]["cpu_s"] / med["plain"]["cpu_s"],
        "evaluation_wall_s": per_eval["wall_s"], "evaluation_cpu_s": per_eval["cpu_s"],
        "in_run_within_cpu_s": statistics.median(c[1] for c in result["calls_in_spell_runs"]["within"]),
        "in_run_nearest_cpu_s": statistics.median(c[1] for c in result["calls_in_spell_runs"]["nearest"]),
        "search_wall_s": statistics.median(result["search"]["wall_s"]),
        "search_cpu_s": statistics.median(result["search"]["cpu_s"]),
    }
    s = result["summary"]
    s["search_share_wall"] = s["search_wall_s"] / s["evaluation_wall_s"]
    s["search_share_cpu"] = s["search_cpu_s"] / s["evaluation_cpu_s"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shield_db_unet_ratio.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(s, indent=1))


if __name__ == "__main__":
    main()
