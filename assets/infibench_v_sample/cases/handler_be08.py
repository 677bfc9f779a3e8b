def clip(score, total, verdicts):
    # A case-provided post handler: the idempotency keyword only counts together with the setting.
    if verdicts[0] == 'unmatch':
        return 0.0, total, 'visibility_timeout missing'
    return score, total, 'ok'
