import pytest

from qtrainer.callbacks import TQDMProgressBar


def simulate_run(trainer, bar, epochs=2):
    """Drive the bar through sanity check, ``epochs`` epochs with validation, then test and predict."""
    bar.setup(trainer, None, "fit")
    trainer.sanity_checking = True
    bar.on_validation_start(trainer, None)
    for i in range(trainer.num_sanity_val_steps):
        bar.on_validation_batch_end(trainer, None, None, None, i)
    bar.on_validation_end(trainer, None)
    trainer.sanity_checking = False
    bar.on_train_start(trainer, None)
    for epoch in range(epochs):
        trainer.current_epoch = epoch
        bar.on_train_epoch_start(trainer, None)
        for i in range(trainer.num_training_batches):
            trainer.progress_bar_metrics = {"acc": 0.5 + epoch / 10, "loss": 1.0 / (1 + i + 10 * epoch)}
            bar.on_train_batch_end(trainer, None, None, None, i)
        bar.on_validation_start(trainer, None)
        for i in range(trainer.num_val_batches):
            bar.on_validation_batch_end(trainer, None, None, None, i)
        trainer.progress_bar_metrics["val_acc"] = 0.75
        bar.on_validation_end(trainer, None)
        bar.on_train_epoch_end(trainer, None)
    bar.on_train_end(trainer, None)
    bar.teardown(trainer, None, "fit")
    trainer.state_stage = "test"
    bar.on_test_start(trainer, None)
    for i in range(trainer.num_test_batches):
        bar.on_test_batch_end(trainer, None, None, None, i)
    bar.on_test_end(trainer, None)
    trainer.state_stage = "predict"
    bar.on_predict_start(trainer, None)
    for i in range(trainer.num_predict_batches):
        bar.on_predict_batch_end(trainer, None, None, None, i)
    bar.on_predict_end(trainer, None)


def test_bars_show_epoch_metrics_and_every_stage(make_trainer, capsys):
    trainer = make_trainer()
    simulate_run(trainer, TQDMProgressBar(leave=True))
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    for text in ("Sanity Checking", "Epoch 0", "Epoch 1", "Validation", "Testing", "Predicting", "4/4", "it/s"):
        assert text in err, text
    assert "loss=0.0714" in err  # the last train loss of epoch 1: 1 / (1 + 3 + 10)
    assert "val_acc=0.75" in err and "acc=0.6" in err
    # the loss comes first in the postfix
    last_epoch_line = [seg for seg in err.replace("\r", "\n").split("\n") if seg.startswith("Epoch 1")][-1]
    assert last_epoch_line.index("loss=") < last_epoch_line.index("acc=")


@pytest.mark.parametrize("refresh_rate, rank0", [(0, True), (1, False)])
def test_disabled_bar_prints_nothing(make_trainer, capsys, refresh_rate, rank0):
    trainer = make_trainer()
    trainer.is_global_zero = rank0
    bar = TQDMProgressBar(refresh_rate=refresh_rate)
    simulate_run(trainer, bar)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_refresh_rate_still_reaches_the_total(make_trainer, capsys):
    trainer = make_trainer()
    trainer.num_training_batches = 7
    bar = TQDMProgressBar(refresh_rate=3)
    bar.on_train_epoch_start(trainer, None)
    seen = []
    for i in range(7):
        bar.on_train_batch_end(trainer, None, None, None, i)
        seen.append(bar.train_bar.n)
    assert seen == [0, 0, 3, 3, 3, 6, 7]
    bar.on_train_end(trainer, None)


def test_exception_closes_every_open_bar(make_trainer, capsys):
    trainer = make_trainer()
    bar = TQDMProgressBar()
    bar.on_train_epoch_start(trainer, None)
    bar.on_validation_start(trainer, None)
    open_bars = [bar.train_bar, bar.val_bar]
    bar.on_exception(trainer, None, RuntimeError("boom"))
    assert bar.train_bar is None and bar.val_bar is None
    assert all(b.disable for b in open_bars)  # tqdm marks a closed bar disabled


def test_unknown_length_gives_a_bar_without_total(make_trainer, capsys):
    trainer = make_trainer()
    trainer.num_training_batches = float("inf")
    bar = TQDMProgressBar()
    bar.on_train_epoch_start(trainer, None)
    assert bar.train_bar.total is None
    bar.on_train_batch_end(trainer, None, None, None, 0)
    bar.teardown(trainer, None, "fit")
    assert "Epoch 0" in capsys.readouterr().err


def test_bad_refresh_rate_is_named():
    with pytest.raises(ValueError, match="refresh_rate=-1"):
        TQDMProgressBar(refresh_rate=-1)


def test_postfix_is_read_when_the_bar_draws_not_on_every_batch(make_trainer, capsys, monkeypatch):
    from qtrainer.callbacks import progress

    formatted = []
    original = progress._postfix
    monkeypatch.setattr(progress, "_postfix", lambda metrics: formatted.append(dict(metrics)) or original(metrics))
    trainer = make_trainer()
    trainer.num_training_batches = 200
    bar = TQDMProgressBar()
    bar.on_train_epoch_start(trainer, None)
    for i in range(200):
        trainer.progress_bar_metrics = {"loss": float(i)}
        bar.on_train_batch_end(trainer, None, None, None, i)
    bar.on_train_epoch_end(trainer, None)
    bar.on_train_end(trainer, None)
    assert 1 <= len(formatted) < 50  # tqdm redraws at most every 0.1 s, not 200 times
    assert formatted[-1] == {"loss": 199.0}
    assert "loss=199" in capsys.readouterr().err
