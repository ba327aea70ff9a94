"""Issue 18: can branch and bound (the HiGHS MILP oracle) decide an undecided input of the FMNIST GloRo 2C2F?

The oracle refuses networks above 4,096 hidden ReLUs; here the cap is lifted for a measurement only.
Usage (after the bracket run of benchmarks/RESULTS.md, issue 18, wrote its rows to ROWS)::

    PYTHONPATH=src python benchmarks/bab_large_network.py SECONDS_PER_INPUT COUNT [ROWS]
"""
import json, sys, time
import torch
import certaudit.verify.milp as milp
from certaudit.data import load_dataset
from certaudit.defenses.lipschitz import LipschitzDefense
from certaudit.models import load_checkpoint
from certaudit.results import read_rows
from certaudit.verify import oracle

torch.set_num_threads(1)
limit = float(sys.argv[1]) if len(sys.argv) > 1 else 120.0
count = int(sys.argv[2]) if len(sys.argv) > 2 else 2
_orig = milp.exact_network
oracle.exact_network = lambda model, shape, max_neurons=10**6: _orig(model, shape, max_neurons)
net, meta = load_checkpoint("src/certaudit/zoo/fmnist_gloro_eps.safetensors")
d = LipschitzDefense(net, 10, 0.3, input_shape=(1, 28, 28))
x, y = load_dataset("fashion-mnist", "test")
_, rows = read_rows(sys.argv[3] if len(sys.argv) > 3 else "runs/i18b/fmnist_gloro_eps.jsonl")
und = [r["index"] for r in rows if r["certified"] and r["correct"] and r["degraded_by"] is None
       and not r["proven_nondegradable"]][:count]
for i in und:
    t0 = time.perf_counter()
    (v,) = oracle.lipschitz_degradable(d, x[i:i + 1], 0.3, time_limit=limit)
    print(json.dumps({"index": i, "decided": v.decided, "status": v.status, "method": v.method, "slack": v.slack,
                      "bound": v.bound, "solves": v.solves, "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
