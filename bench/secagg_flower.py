"""Flower's SecAgg+ beside ours (BENCHMARKS.md, "Secure aggregation"): rounds of Flower's
`SecAggPlusWorkflow` (client mod `secaggplus_mod`) against the same rounds without it
(`DefaultWorkflow`'s plain FedAvg fit), in Flower's simulation runtime (Ray), every client
sending one float32 vector of `--params` values.

One warm simulation per client count: Ray and its actors start once, then for each size the
plain workflow and the SecAgg+ workflow each run `--rounds` rounds, and each round is timed from
the strategy's `configure_fit` to the end of its `aggregate_fit` (the whole round: the clients
run in the same Ray cluster on the same machine). The first round of the simulation pays for the
actors starting and is reported apart; each cell's mean and minimum are over its rounds after
its first (the first round of each workflow also pays for its own warm-up). Wall-clock seconds:
Flower's work is spread over Ray's processes, so the server's own CPU time is not the round's.

Run in a venv of its own (never the project's .venv):
    python3 -m venv /tmp/flwr-venv && /tmp/flwr-venv/bin/pip install "flwr[simulation]==1.42.0"
    /tmp/flwr-venv/bin/python bench/secagg_flower.py --sites 5 --params 100000,1000000
"""

import argparse
import json
import time

import numpy as np
from flwr.app.message_type import MessageType
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.simulation import run_simulation


def secagg_when_asked(msg, ctxt, call_next):
    """`secaggplus_mod` for the SecAgg+ workflow's messages; plain fit messages pass through,
    so that both workflows run in the same warm simulation."""
    if (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    ):
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--params", default="100000,1000000")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    sites = args.sites
    sizes = [int(x) for x in args.params.split(",") if x]

    class Client(NumPyClient):
        def fit(self, parameters, config):
            n = int(config["params"])
            rng = np.random.default_rng()
            return [rng.standard_normal(n).astype(np.float32) * 0.01], 1, {}

    def client_fn(context: Context):
        return Client().to_client()

    client_app = ClientApp(client_fn=client_fn, mods=[secagg_when_asked])
    server_app = ServerApp()
    rows = []
    first = {}

    @server_app.main()
    def server(grid, context: Context) -> None:
        for n in sizes:
            for secagg in ["no", "yes"]:
                starts, ends = {}, {}

                class TimedFedAvg(FedAvg):
                    """FedAvg that notes when each round's fit starts and ends."""

                    def configure_fit(self, server_round, parameters, client_manager):
                        starts[server_round] = time.perf_counter()
                        return super().configure_fit(server_round, parameters, client_manager)

                    def aggregate_fit(self, server_round, results, failures):
                        out = super().aggregate_fit(server_round, results, failures)
                        ends[server_round] = time.perf_counter()
                        return out

                strategy = TimedFedAvg(
                    fraction_fit=1.0,
                    fraction_evaluate=0.0,
                    min_fit_clients=sites,
                    min_available_clients=sites,
                    on_fit_config_fn=lambda _round, n=n: {"params": n},
                    initial_parameters=ndarrays_to_parameters([np.zeros(n, np.float32)]),
                )
                ctx = LegacyContext(
                    context=context,
                    config=ServerConfig(num_rounds=args.rounds),
                    strategy=strategy,
                )
                if secagg == "yes":
                    # Flower's own example's proportions: shares to about half the clients,
                    # a quarter of them to reconstruct.
                    fit = SecAggPlusWorkflow(
                        num_shares=max(3, sites // 2 + 1),
                        reconstruction_threshold=max(2, sites // 4 + 1),
                    )
                    workflow = DefaultWorkflow(fit_workflow=fit)
                else:
                    workflow = DefaultWorkflow()
                workflow(grid, ctx)
                rounds = [ends[r] - starts[r] for r in sorted(ends) if r in starts]
                if not first:
                    first["seconds"] = round(rounds[0], 3)
                warm = rounds[1:] or rounds
                rows.append(
                    {
                        "sites": sites,
                        "params": n,
                        "secagg": secagg,
                        "round_seconds": [round(x, 3) for x in rounds],
                        "warm_round_mean": round(sum(warm) / len(warm), 3),
                        "warm_round_min": round(min(warm), 3),
                    }
                )

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=sites,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    print(json.dumps({"first_round_of_the_simulation": first.get("seconds")}))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
