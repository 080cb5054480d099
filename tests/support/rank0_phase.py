"""Under torchrun: rank 0 works alone for ``SLOW`` seconds inside a named phase while the others wait for it, with
``--ddp_timeout TIMEOUT``; each rank prints what it got and exits as the CLIs do (2 for a PhaseTimeout)."""

import sys
import time

from pipeline.common.collective import Collective, PhaseTimeout
from pipeline.common.process_group import distributed_env, join_process_group, leave_process_group

timeout, slow = float(sys.argv[1]), float(sys.argv[2])
env = distributed_env()
join_process_group("cpu", timeout_s=timeout)
collective = Collective(env.rank, env.world, timeout)
try:
    with collective.phase("exporting the weights (rank 0 writes them)"):
        if env.rank == 0:
            time.sleep(slow)
        collective.barrier()
except PhaseTimeout as exc:
    print(f"rank {env.rank}: {exc}", flush=True)
    sys.exit(2)
print(f"rank {env.rank}: ok", flush=True)
leave_process_group(together=True)
