"""LLaDA pretraining, one subpackage per concern (each __init__ says what it owns and may import):

    config.py    typed configs (imports no domain)      checks.py  every start-up check, in one place
    model/       the network                            objective/ forward process, loss, likelihood, sampler
    engine/      DeepSpeed setup, precision, lr         checkpoint/ save, load, verify, convert, lock
    monitor/     metrics, W&B, report pictures          hf/        the Hugging Face format
    loop.py, faults.py, launcher_watch.py               the training loop; signals and fault handling

Entry points (`python -m pretrain.X`): train, evaluate, generate, export, report, plan, model.
"""
