import paddle
import pytest

from qtrainer.callbacks import LearningRateMonitor


def params():
    return paddle.nn.Linear(2, 2).parameters()


def started(make_trainer, cb, optimizers, schedulers=(), log_every_n_steps=1):
    trainer = make_trainer(loggers=[object()])
    trainer.optimizers = list(optimizers)
    trainer.lr_schedulers = list(schedulers)
    trainer.log_every_n_steps = log_every_n_steps
    cb.setup(trainer, None, "fit")
    cb.on_train_start(trainer, None)
    return trainer


def test_names_follow_the_optimizer_classes(make_trainer):
    cb = LearningRateMonitor()
    sgd_a = paddle.optimizer.SGD(learning_rate=0.1, parameters=params())
    adam = paddle.optimizer.Adam(learning_rate=0.01, parameters=params())
    sgd_b = paddle.optimizer.SGD(learning_rate=0.2, parameters=params())
    sgd_c = paddle.optimizer.SGD(learning_rate=0.3, parameters=params())
    started(make_trainer, cb, [sgd_a, adam, sgd_b, sgd_c])
    assert cb.lr_names == ["lr-SGD", "lr-Adam", "lr-SGD-1", "lr-SGD-2"]


def test_a_named_scheduler_gives_its_name(make_trainer):
    cb = LearningRateMonitor()
    scheduler = paddle.optimizer.lr.StepDecay(0.1, step_size=1)
    opt = paddle.optimizer.SGD(learning_rate=scheduler, parameters=params())
    started(make_trainer, cb, [opt], [{"scheduler": scheduler, "interval": "epoch", "frequency": 1, "name": "my-lr"}])
    assert cb.lr_names == ["my-lr"]


def test_step_interval_logs_the_current_rate_every_n_steps(make_trainer):
    cb = LearningRateMonitor(logging_interval="step")
    scheduler = paddle.optimizer.lr.StepDecay(1.0, step_size=1, gamma=0.5)
    opt = paddle.optimizer.SGD(learning_rate=scheduler, parameters=params())
    trainer = started(make_trainer, cb, [opt], [{"scheduler": scheduler, "interval": "step", "frequency": 1}],
                      log_every_n_steps=2)
    cb.on_train_epoch_start(trainer, None)
    for step in range(5):
        trainer.global_step = step
        cb.on_train_batch_start(trainer, None, None, step)
        scheduler.step()
    assert trainer.logged == [({"lr-SGD": 1.0}, 0), ({"lr-SGD": 0.25}, 2), ({"lr-SGD": 0.0625}, 4)]


def test_accumulation_batches_log_once_per_optimizer_step(make_trainer):
    cb = LearningRateMonitor(logging_interval="step")
    opt = paddle.optimizer.SGD(learning_rate=0.1, parameters=params())
    trainer = started(make_trainer, cb, [opt])
    for batch_idx in range(6):  # two batches per optimizer step
        trainer.global_step = batch_idx // 2
        cb.on_train_batch_start(trainer, None, None, batch_idx)
    assert [step for _, step in trainer.logged] == [0, 1, 2]


def test_epoch_interval_logs_at_epoch_start(make_trainer):
    cb = LearningRateMonitor(logging_interval="epoch")
    opt = paddle.optimizer.SGD(learning_rate=0.1, parameters=params())
    trainer = started(make_trainer, cb, [opt])
    cb.on_train_batch_start(trainer, None, None, 0)
    assert trainer.logged == []
    trainer.global_step = 7
    cb.on_train_epoch_start(trainer, None)
    assert trainer.logged == [({"lr-SGD": pytest.approx(0.1)}, 7)]


def test_default_interval_follows_each_scheduler(make_trainer):
    cb = LearningRateMonitor()
    per_step = paddle.optimizer.lr.StepDecay(0.5, step_size=1)
    stepped = paddle.optimizer.Adam(learning_rate=per_step, parameters=params())
    fixed = paddle.optimizer.SGD(learning_rate=0.1, parameters=params())
    trainer = started(make_trainer, cb, [stepped, fixed],
                      [{"scheduler": per_step, "interval": "step", "frequency": 1}])
    cb.on_train_epoch_start(trainer, None)
    cb.on_train_batch_start(trainer, None, None, 0)
    assert trainer.logged == [({"lr-SGD": pytest.approx(0.1)}, 0), ({"lr-Adam": 0.5}, 0)]


def test_momentum(make_trainer):
    cb = LearningRateMonitor(logging_interval="epoch", log_momentum=True)
    momentum = paddle.optimizer.Momentum(learning_rate=0.1, momentum=0.8, parameters=params())
    adam = paddle.optimizer.Adam(learning_rate=0.01, beta1=0.7, parameters=params())
    trainer = started(make_trainer, cb, [momentum, adam])
    cb.on_train_epoch_start(trainer, None)
    (metrics, _), = trainer.logged
    assert metrics == pytest.approx(
        {"lr-Momentum": 0.1, "lr-Momentum-momentum": 0.8, "lr-Adam": 0.01, "lr-Adam-momentum": 0.7}
    )


def test_needs_a_logger_when_fitting(make_trainer):
    cb = LearningRateMonitor()
    trainer = make_trainer(loggers=[])
    with pytest.raises(ValueError, match=r"needs a logger; Trainer\(logger=False\)"):
        cb.setup(trainer, None, "fit")
    cb.setup(trainer, None, "test")  # nothing to log outside fit: no error


def test_bad_interval_is_named():
    with pytest.raises(ValueError, match=r"logging_interval='batch'.*\[None, 'step', 'epoch'\]"):
        LearningRateMonitor(logging_interval="batch")
