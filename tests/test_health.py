"""Units of the failure handling: the heartbeat diagnosis on a real TCP store, the non-finite
guard and its per-rank flags, the NCCL settings, and the recipe-key check; when the step's
gradient normalization may wait for clipping."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.distributed as dist

from lightning_3d import train
from lightning_3d.health import Heartbeat, is_communication_failure, nccl_debug_env, summary
from lightning_3d.nonfinite import NonFiniteError, NonFiniteGuard, step_health
from lightning_3d.runtime import StepGuard, clip_reads_gradients_first


@pytest.fixture
def store_port():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    yield server.port
    del server


def test_diagnosis_names_the_dead_rank_and_the_one_that_failed_on_its_own(store_port, monkeypatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # nobody hosts the store here: no lingering
    beats = [Heartbeat(rank, 4, "127.0.0.1", store_port, "test") for rank in range(4)]
    try:
        beats[2].stop()  # rank 2 dies: its heartbeat stops, it reports nothing
        beats[1].step = 7
        beats[1].report_failure(ValueError("data file x.bin is empty (0 bytes)"))
        beats[0].report_failure(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1234"))
        report = beats[0].wait_for_diagnosis()
        assert "rank 2 stopped responding (no heartbeat for 3 s and no error reported): dead or frozen" in report
        assert "rank 1 failed at step 7: ValueError: data file x.bin is empty (0 bytes)" in report
        assert "rank 3 still alive without an error" in report
        # rank 3, still blocked in a collective, has its diagnosis ready too
        assert "rank 2 stopped responding" in beats[3].wait_for_diagnosis()
    finally:
        for beat in beats:
            beat.stop()


def test_store_host_gone_is_said(monkeypatch) -> None:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    beat = Heartbeat(1, 2, "127.0.0.1", server.port, "gone")
    del server  # the process that hosted the store is gone
    try:
        report = beat.wait_for_diagnosis()
        assert f"the rendezvous store at 127.0.0.1:{beat.address.split(':')[1]} is unreachable" in report
        assert "probably dead or frozen" in report
    finally:
        beat.stop()


@pytest.mark.parametrize(
    "error, communication",
    [
        (RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:63111"), True),
        (RuntimeError("[unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation to complete"), True),
        (dist.DistNetworkError("Broken pipe"), True),
        (ValueError("data file x is empty"), False),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    ],
)
def test_communication_failures_are_told_from_own_errors(error: BaseException, communication: bool) -> None:
    assert is_communication_failure(error) is communication


def test_summary_is_one_line() -> None:
    assert summary(RuntimeError("first line\nframe #0 ...\nframe #1 ...")) == "RuntimeError: first line"


def test_nccl_settings_leave_a_flight_recorder_dump_in_the_run_dir() -> None:
    env = nccl_debug_env("/runs/a/nccl_traces")
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and int(env["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0
    assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == "/runs/a/nccl_traces/nccl_trace_rank_"


def test_nccl_timeout_raises_in_the_main_thread_rather_than_ending_the_process() -> None:
    # 2 (CleanUpOnly): the watchdog aborts the communicators and keeps the process, so the waiting
    # collective raises and the strategy's on_exception names the broken rank; 1 and 3 end the
    # process from the watchdog thread, skipping it
    assert nccl_debug_env("/runs/a/nccl_traces")["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"


def _params_with_grads(*grads: float) -> list[torch.nn.Parameter]:
    params = []
    for value in grads:
        param = torch.nn.Parameter(torch.zeros(3))
        param.grad = torch.full((3,), value)
        params.append(param)
    return params


def test_step_health_on_one_process() -> None:
    health = step_health(_params_with_grads(1.0, 2.0), torch.tensor(2.5), 1, torch.device("cpu"))
    assert health.norm.item() == pytest.approx((3 * 1 + 3 * 4) ** 0.5)
    assert health.bad_loss == [] and health.bad_grads == [] and health.sums is None and not health.stop
    sums = torch.tensor([7.0, 3.0], dtype=torch.float64)
    health = step_health(_params_with_grads(1.0, float("inf")), torch.tensor(float("nan")), 1, torch.device("cpu"), sums, True)
    assert health.bad_loss == [0] and health.bad_grads == [0] and health.stop
    assert health.sums.tolist() == [7.0, 3.0]


def test_guard_stop_skip_and_limit() -> None:
    with pytest.raises(NonFiniteError, match=r"^step 4: non-finite loss on rank 1; non-finite gradient norm on ranks 0, 1\."):
        NonFiniteGuard("stop").should_skip(4, [1], [0, 1])
    guard = NonFiniteGuard("skip", max_skipped=2)
    with pytest.warns(UserWarning, match=r"step 2: non-finite gradient norm on rank 3; update skipped \(2 in a row, 2 in all\)"):
        assert guard.should_skip(1, [], [3]) and guard.should_skip(2, [], [3])
    assert not guard.should_skip(3, [], [])  # a good step resets the run of skips
    with pytest.warns(UserWarning, match=r"\(2 in a row, 4 in all\)"):
        assert guard.should_skip(4, [0], []) and guard.should_skip(5, [0], [])
    with pytest.raises(NonFiniteError, match="3 steps in a row, more than training.max_skipped=2"):
        guard.should_skip(6, [0], [])
    restored = NonFiniteGuard("skip")
    restored.load_state_dict(guard.state_dict())
    assert restored.skipped_total == 5 and restored.skipped_in_a_row == 3


@pytest.mark.parametrize("policy, max_skipped, message", [("ignore", 5, "on_nonfinite='ignore'"), ("skip", -1, "max_skipped=-1")])
def test_guard_rejects_bad_options(policy: str, max_skipped: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NonFiniteGuard(policy, max_skipped)


def test_recipe_with_an_unknown_key_is_named_with_the_valid_ones(tmp_path, monkeypatch) -> None:
    (tmp_path / "typo.yaml").write_text("# @package _global_\ndefaults:\n  - override /model: debug\nparallel:\n  tpp: 2\ndata:\n  seq_len: 32\n")
    monkeypatch.setattr(train, "RECIPES_DIR", tmp_path)
    problems = train.recipe_key_problems(["recipe=typo"])
    assert problems == [
        f"{tmp_path / 'typo.yaml'}: unknown config key 'parallel.tpp' (did you mean parallel.tp?); valid keys at parallel: "
        "dp_replicate, dp_shard, cp, tp, pp, sequence_parallel, loss_parallel, reshard_after_forward, zero_stage, pp_schedule, "
        "microbatches, stages_per_rank, pp_layers, pp_embedding_weight, pp_head_weight, cp_backend, init_timeout_s, timeout_s"
    ]
    assert train.recipe_key_problems(["recipe=missing"]) == []  # Hydra lists the available recipes


class _Reader(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        pass


class _ClipsItself(L.LightningModule):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        pass


@pytest.mark.parametrize(
    "trainer_args, module, folds",
    [
        ({"gradient_clip_val": 1.0}, L.LightningModule(), True),  # Lightning's default algorithm is "norm"
        ({"gradient_clip_val": 1.0, "gradient_clip_algorithm": "norm"}, L.LightningModule(), True),
        ({}, L.LightningModule(), False),  # no clipping: nothing to fold into
        ({"gradient_clip_val": 1.0, "gradient_clip_algorithm": "value"}, L.LightningModule(), False),
        ({"gradient_clip_val": 1.0, "callbacks": [_Reader()]}, L.LightningModule(), False),  # a hook reads first
        ({"gradient_clip_val": 1.0}, _ClipsItself(), False),
    ],
)
def test_normalization_waits_for_clipping_only_when_clipping_reads_first(trainer_args, module, folds) -> None:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, **trainer_args)
    assert clip_reads_gradients_first(trainer, module) is folds


def test_the_step_guard_asks_again_when_a_callback_joins() -> None:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0)
    module, guard = L.LightningModule(), StepGuard()
    assert guard.folds_into_clip(trainer, module)
    trainer.callbacks.append(_Reader())  # it reads the gradients before clipping from now on
    assert not guard.folds_into_clip(trainer, module)
