"""Runs one experiment main across the GPU nodes of a Ray cluster: one process per node (all of the node's
GPUs local to it), jax.distributed wired through LVS_COORDINATOR / LVS_NUM_PROCESSES / LVS_PROCESS_ID
(`lvs_jax.core.distributed`, explicit mode). Needs `pip install ray` on the cluster (not a dependency of
lvs_jax) and the repository and workdir at the same path on every node (shared file system).

  python launch/ray_launch.py --nodes=4 --gpus_per_node=8 -- experiments/lvs.py \\
      --config=experiments/configs/lvs.py --workdir=/shared/runs/lvs --config.model=/shared/models/llama3-8b

Re-running the same command resumes from the workdir, as with every main.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--nodes", type=int, required=True)
  ap.add_argument("--gpus_per_node", type=int, default=8)
  ap.add_argument("--port", type=int, default=12345)
  ap.add_argument("main_and_args", nargs=argparse.REMAINDER, help="-- experiments/<main>.py --config=... ...")
  a = ap.parse_args()
  cmd = [x for x in a.main_and_args if x != "--"]
  if not cmd:
    ap.error("give the main and its flags after --")
  import ray
  from ray.util.placement_group import placement_group
  from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

  ray.init(address="auto")
  pg = placement_group([{"GPU": a.gpus_per_node, "CPU": 1}] * a.nodes, strategy="STRICT_SPREAD")
  ray.get(pg.ready())
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def on(i):
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)

  @ray.remote(num_gpus=a.gpus_per_node, num_cpus=1)
  def node_ip() -> str:
    return ray.util.get_node_ip_address()

  @ray.remote(num_gpus=a.gpus_per_node, num_cpus=1)
  def run(pid: int, coordinator: str) -> int:
    env = dict(os.environ, LVS_COORDINATOR=coordinator, LVS_NUM_PROCESSES=str(a.nodes), LVS_PROCESS_ID=str(pid),
               HF_HUB_OFFLINE="1")
    return subprocess.call([sys.executable, *cmd], cwd=root, env=env)

  coordinator = f"{ray.get(node_ip.options(scheduling_strategy=on(0)).remote())}:{a.port}"
  codes = ray.get([run.options(scheduling_strategy=on(i)).remote(i, coordinator) for i in range(a.nodes)])
  print("exit codes per process:", codes)
  return max(codes)


if __name__ == "__main__":
  sys.exit(main())
