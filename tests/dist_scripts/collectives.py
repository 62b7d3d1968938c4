"""Run under torchrun (gloo): exercises sharding, rank-0-first validation and gathering."""
import json
import sys

from igds_fast.distributed import QuietRankError, agree_min, gather_to_main, init_distributed, main_first, shard, shutdown
from igds_fast.errors import IGDSInputError

mode, out_path = sys.argv[1], sys.argv[2]
ctx = init_distributed("cpu", timeout_s=60)


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
everything = gather_to_main(ctx, {"rank": ctx.rank, "items": mine, "status": status, "agreed": agreed})
if ctx.is_main:
    with open(out_path, "w") as f:
        json.dump(everything, f)
shutdown(ctx)
