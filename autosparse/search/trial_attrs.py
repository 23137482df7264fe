"""Names of what a trial stores about itself in Optuna storage (user attrs).

In a module of their own, free of torch, so the samplers that read trials (knapsack, screening)
and the objective that writes them share one spelling.
"""

CANDIDATE_ATTR = "candidate"      # the candidate as JSON
KEY_ATTR = "candidate_key"        # its content hash: equal candidates, equal keys
METRICS_ATTR = "metrics"          # every metric of a completed trial
