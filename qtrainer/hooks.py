"""The hook contract: the one place that documents when each hook fires.

Every hook fires on the callbacks first (in the order they were given), then on the module when
the module defines it (the two checkpoint points are callback hooks only). ``fit`` fires::

    setup("fit")
    configure_model                      # replace layers here (QAT): no optimizer exists yet
    [resuming] on_load_checkpoint(ckpt)  # callbacks, then module
               load_state_dict(state)    # callbacks; then model weights are restored
    configure_optimizers                 # optimizers see every parameter, new ones included;
                                         # [resuming] optimizer/scheduler/trainer state restored
    on_fit_start
    on_sanity_check_start                # only when num_sanity_val_steps > 0 and there is validation
      <validation block>                 # metrics of the sanity check are discarded
    on_sanity_check_end
    on_train_start
    for each epoch:
      on_train_epoch_start
      for each batch:
        on_train_batch_start(batch, batch_idx)
        training_step                    # the module's
        on_before_backward(loss)
        on_after_backward
        [when an optimizer step is due (accumulate_grad_batches)]
          on_before_optimizer_step(optimizer)   # then gradient clipping, optimizer.step()
          on_before_zero_grad(optimizer)        # then clear_grad(); "step" schedulers advance
        on_train_batch_end(outputs, batch, batch_idx)
        [val_check_interval reached: <validation block>]
        [when the optimizer stepped] on_step_checkpoint    # checkpoint point: a save here resumes
                                                           # mid-epoch exactly (every_n_train_steps)
      <validation block>                 # when due at the end of the epoch
      on_train_epoch_end                 # train epoch means are already in callback_metrics
      "epoch" schedulers advance
      on_epoch_checkpoint                # checkpoint point: every other hook of the epoch ran
      the stop decision (EarlyStopping, max_steps) is taken across ranks
    on_train_end
    on_fit_end
    teardown("fit")

    <validation block> = on_validation_start, on_validation_epoch_start,
        (on_validation_batch_start, validation_step, on_validation_batch_end) per batch,
        on_validation_epoch_end, on_validation_end

A save (``trainer.save_checkpoint``) fires ``state_dict`` (callbacks) and ``on_save_checkpoint``
(callbacks, module). The two checkpoint points come after every hook that may change state in that
step or epoch, so a callback that saves there (``ModelCheckpoint``, or any other that implements
them) sees what all the others did, wherever it stands in the callback list.

``validate``/``test``/``predict`` fire ``setup(stage)``, ``configure_model``, the matching block
(``on_test_start`` ... or ``on_predict_start`` ...) and ``teardown(stage)``.

A callback (or the module) receives a hook only when it overrides it: the Trainer looks this up
once per hook and run (``overrides_hook``), so the many hooks nobody overrides cost nothing per
batch. Replacing a hook method on an instance therefore takes effect when done before that
hook first fires in a run (e.g. in ``setup``).

When anything raises: ``on_exception(exc)`` fires once on every callback, then the end hooks of
the stages that had started (``on_validation_end``, ``on_train_end``, ``on_fit_end``: end hooks
always run; ``trainer.failed`` is True so they can skip work such as exporting), then
``teardown``, and the exception propagates.
"""
from __future__ import annotations

from typing import Any

# Hooks that the module receives too (without the trainer/module arguments).
MODULE_HOOKS = frozenset(
    {
        "setup", "configure_model", "teardown", "on_save_checkpoint", "on_load_checkpoint",
        "on_fit_start", "on_fit_end", "on_train_start", "on_train_end",
        "on_train_epoch_start", "on_train_epoch_end", "on_train_batch_start", "on_train_batch_end",
        "on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad",
        "on_validation_start", "on_validation_end", "on_validation_epoch_start",
        "on_validation_epoch_end", "on_validation_batch_start", "on_validation_batch_end",
        "on_test_start", "on_test_end", "on_test_epoch_start", "on_test_epoch_end",
        "on_test_batch_start", "on_test_batch_end",
        "on_predict_start", "on_predict_end", "on_predict_epoch_start", "on_predict_epoch_end",
        "on_predict_batch_start", "on_predict_batch_end",
    }
)


def overrides_hook(obj: Any, base: type, name: str) -> bool:
    """True when ``obj`` has its own ``name`` hook rather than ``base``'s no-op.

    Anything ``base`` does not define counts as overridden (it is looked up at call time).
    """
    default = getattr(base, name, None)
    if default is None or name in getattr(obj, "__dict__", ()):
        return True
    return getattr(type(obj), name, None) is not default
