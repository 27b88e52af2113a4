"""LLaDA pretraining, one subpackage per concern (each __init__ says what it owns and may import):

    config.py    typed configs (imports no domain)      checks.py  every start-up check, in one place
    model/       the network                            objective/ forward process, loss, likelihood, sampler
    engine/      DeepSpeed setup, precision, lr         checkpoint/ save, load, verify, convert, lock
    monitor/     metrics, W&B, report pictures          hf/        the Hugging Face format
    loop.py, faults.py, launcher_watch.py               the training loop; signals and fault handling

Entry points (`python -m pretrain.X`): train, evaluate, generate, export, report, plan, model.
"""

import logging as _logging


class _QuietCpuFallback(_logging.Filter):
    """DeepSpeed warns "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable
    to detect it." at import, on every CPU machine and every entry point (--help included). Here that is
    the expected outcome, not news; a GPU run that finds no GPU fails in pretrain.engine.build.check_device."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU.")


_logging.getLogger("DeepSpeed").addFilter(_QuietCpuFallback())  # the logger deepspeed.utils.logger is
