"""Run under torchrun (gloo): exercises sharding, rank-0-first validation and gathering."""
import json
import sys
import time

from igds_fast.distributed import QuietRankError, agree_min, gather_to_main, init_distributed, main_first, shard, shutdown
from igds_fast.errors import IGDSInputError

mode, out_path = sys.argv[1], sys.argv[2]
# "late": collectives time out after 3 s, and rank 0 reaches the final gather 8 s after rank 1.
ctx = init_distributed("cpu", timeout_s=3 if mode == "late" else 60)


def validate():
    if mode == "bad":
        raise IGDSInputError("the VE file is missing")
    return "ok"


try:
    status = main_first(ctx, validate)
except QuietRankError:
    sys.exit(3)
except IGDSInputError as exc:
    print(f"igds-fast: error: {exc}", file=sys.stderr)
    sys.exit(2)
mine = shard(list(range(11)), ctx)
agreed = agree_min(ctx, 40 - 7 * ctx.rank)  # e.g. batch sizes chosen from each rank's free memory
if mode == "late" and ctx.is_main:
    time.sleep(8)  # e.g. rank 0 still sampling while rank 1 had no share left
everything = gather_to_main(ctx, {"rank": ctx.rank, "items": mine, "status": status, "agreed": agreed})
if ctx.is_main:
    with open(out_path, "w") as f:
        json.dump(everything, f)
shutdown(ctx)
