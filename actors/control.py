"""The job's named control actor (`videorl-control`): how a running job is told to change.

`videorl scale --reward NAME=N` sets a desired replica count here; the training loop reads the
requests once per step and applies them (new replicas take work at once, removed ones finish
what they hold). The actor only stores requests, so it can never block the job. Requests not yet
applied at a checkpoint are saved with it and sent again to the resumed job's control actor.
"""

from __future__ import annotations

import ray

NAMESPACE = "videorl"
NAME = "videorl-control"


class Control:
    def __init__(self, reward_models: list[str]):
        self.models = list(reward_models)
        self.requests: dict[str, int] = {}
        self.status: dict = {}

    def scale(self, model: str, replicas: int) -> dict[str, int]:
        if model not in self.models:
            raise ValueError(f"unknown reward model {model!r}; this job has {self.models}")
        if replicas < 1:
            raise ValueError(f"{model}: replicas must be >= 1, got {replicas}")
        self.requests[model] = int(replicas)
        return dict(self.requests)

    def take_requests(self) -> dict[str, int]:
        out, self.requests = self.requests, {}
        return out

    def pending(self) -> dict[str, int]:
        """The requests not yet taken (a checkpoint saves them; the resumed job's control actor gets them again)."""
        return dict(self.requests)

    def report(self, status: dict) -> None:
        self.status = status

    def get_status(self) -> dict:
        return self.status


def control_actor(reward_models: list[str], named: bool = True):
    """The control actor; `named` gives it the well-known name `videorl scale` looks up (one per cluster)."""
    if named:
        try:
            ray.get_actor(NAME, namespace=NAMESPACE)
        except ValueError:
            pass
        else:
            raise ValueError(f"another videorl job already runs on this cluster (actor {NAME!r} in namespace "
                             f"{NAMESPACE!r} exists); `videorl scale` could not tell the two apart")
    options = {"name": NAME, "namespace": NAMESPACE} if named else {}
    return ray.remote(Control).options(**options, num_cpus=0.01, max_restarts=-1).remote(reward_models)


def find_control():
    """The running job's control actor (raises ValueError when no videorl job runs on this cluster)."""
    try:
        return ray.get_actor(NAME, namespace=NAMESPACE)
    except ValueError:
        raise ValueError(f"no running videorl job on this cluster (actor {NAME!r} in namespace {NAMESPACE!r} not found)") from None
