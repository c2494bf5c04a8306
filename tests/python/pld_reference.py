"""Python's side of the PLD accountant tests and benchmark: what Google's `dp-accounting` (its
`PLDAccountant`, connect-the-dots, value_discretization_interval 1e-4, the defaults) and its RDP
accountant say for DP-SGD's Poisson-subsampled Gaussian under add/remove-one neighbours.

    python pld_reference.py < queries.json > answers.json

The input is a JSON list of queries, each either
    {"kind": "epsilon", "q": .., "sigma": .., "steps": .., "delta": ..}
or  {"kind": "noise", "q": .., "steps": .., "delta": .., "epsilon": ..};
the output lists, in the same order, {"pld": .., "rdp": .., "seconds": ..} (ε by each accountant,
and the PLD call's wall time) or {"sigma": .., "seconds": ..} (the smallest noise multiplier
whose PLD ε is at most the target, by dp-accounting's `calibrate_dp_mechanism`, tolerance 1e-6).
"""

import json
import sys
import time

import dp_accounting
from dp_accounting import mechanism_calibration
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant


def event(q, sigma):
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))


def pld_epsilon(q, sigma, steps, delta):
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(event(q, sigma), steps)
    return accountant.get_epsilon(delta)


def rdp_epsilon(q, sigma, steps, delta):
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(event(q, sigma), steps)
    return accountant.get_epsilon(delta)


def answer(query):
    q, steps, delta = query["q"], int(query["steps"]), query["delta"]
    start = time.perf_counter()
    if query["kind"] == "epsilon":
        sigma = query["sigma"]
        pld = pld_epsilon(q, sigma, steps, delta)
        seconds = time.perf_counter() - start
        return {"pld": pld, "rdp": rdp_epsilon(q, sigma, steps, delta), "seconds": seconds}
    sigma = mechanism_calibration.calibrate_dp_mechanism(
        pld_privacy_accountant.PLDAccountant,
        lambda s: dp_accounting.SelfComposedDpEvent(event(q, s), steps),
        query["epsilon"],
        delta,
        mechanism_calibration.ExplicitBracketInterval(0.3, 30.0),
        tol=1e-6,
    )
    return {"sigma": sigma, "seconds": time.perf_counter() - start}


def main():
    queries = json.load(sys.stdin)
    json.dump([answer(q) for q in queries], sys.stdout)


if __name__ == "__main__":
    main()
