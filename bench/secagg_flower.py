"""Flower's SecAgg+ beside ours (BENCHMARKS.md, "Secure aggregation"): one round of Flower's
`SecAggPlusWorkflow` (client mod `secaggplus_mod`) against the same round without it
(`DefaultWorkflow`'s plain FedAvg fit), in Flower's simulation runtime (Ray), every client
sending one float32 vector of `--params` values. Wall-clock seconds of the server's fit workflow
(the whole round: the clients run in the same Ray cluster on the same machine).

Run in a venv of its own (never the project's .venv):
    python3 -m venv /tmp/flwr-venv && /tmp/flwr-venv/bin/pip install "flwr[simulation]==1.42.0"
    /tmp/flwr-venv/bin/python bench/secagg_flower.py --sites 5 --params 1000000
"""

import argparse
import json
import time

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.simulation import run_simulation


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--secagg", choices=["yes", "no"], default="yes")
    args = ap.parse_args()
    n, sites = args.params, args.sites

    class Client(NumPyClient):
        def fit(self, parameters, config):
            rng = np.random.default_rng()
            return [rng.standard_normal(n).astype(np.float32) * 0.01], 1, {}

    def client_fn(context: Context):
        return Client().to_client()

    mods = [secaggplus_mod] if args.secagg == "yes" else []
    client_app = ClientApp(client_fn=client_fn, mods=mods)
    server_app = ServerApp()
    result = {}

    @server_app.main()
    def server(grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=sites,
            min_available_clients=sites,
            initial_parameters=ndarrays_to_parameters([np.zeros(n, np.float32)]),
        )
        ctx = LegacyContext(
            context=context, config=ServerConfig(num_rounds=1), strategy=strategy
        )
        if args.secagg == "yes":
            # Flower's defaults: shares to a fraction of the clients, threshold of them.
            fit = SecAggPlusWorkflow(num_shares=max(3, sites // 2 + 1), reconstruction_threshold=max(2, sites // 4 + 1))
            workflow = DefaultWorkflow(fit_workflow=fit)
        else:
            workflow = DefaultWorkflow()
        start = time.perf_counter()
        workflow(grid, ctx)
        result["seconds"] = time.perf_counter() - start

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=sites,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    print(json.dumps({"sites": sites, "params": n, "secagg": args.secagg, **result}))


if __name__ == "__main__":
    main()
