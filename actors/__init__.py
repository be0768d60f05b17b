"""Ray actors: rollout, reward, learner, control (and their simulated stand-ins for `videorl bench`)."""


def outputs_of_many(outs: list[tuple[dict, dict, dict]]) -> tuple:
    """k (batch, payload, meta) -> the 2k + 1 return objects of a rollout actor's `generate_many`: every batch and
    payload its own object (reward pools and the learner fetch them by reference), the metadata one small list for
    the driver."""
    batches, payloads, metas = zip(*outs)
    return (*batches, *payloads, list(metas))
