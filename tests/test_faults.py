"""Runtime faults on real gloo process groups: a NaN on one rank, a rank killed or frozen mid-run.

- NaN: several cases in one 4-process torchrun group (tests/nonfinite_worker.py).
- Kill / freeze: four independent processes of the CLI, started the way a multi-node
  launcher starts them (one environment per rank, no agent that could kill the others for
  us), so it is the job itself that must notice the lost rank, name it and exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fork_launch import free_port
from test_parity import FORK_LAUNCH

HERE = Path(__file__).parent
NONFINITE_WORKER = HERE / "nonfinite_worker.py"
HANG_WORKER = HERE / "hang_worker.py"
DEBUG_4 = ["recipe=debug", "parallel.dp_shard=2", "parallel.tp=2", "trainer.max_steps=6"]
LOSS_RTOL = 1e-4


def _checkpointing(directory: Path) -> list[str]:
    return [f"checkpoint.dir={directory}", "checkpoint.every_n_steps=2"]


@pytest.fixture(scope="module")
def nonfinite(tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("nonfinite")
    stopped_ckpt = out_dir / "stopped_checkpoints"
    cases = {
        "reference": {"overrides": DEBUG_4},
        # a callback reads the gradients before clipping: they are normalized before it runs (with
        # no reader, the normalization waits for clipping, one pass over the gradients for both)
        "observed": {"overrides": DEBUG_4, "observe": True},
        # NaN loss on rank 1 at step 3: every rank stops before the update, step-2 stays the latest checkpoint
        "stop": {"overrides": DEBUG_4 + _checkpointing(stopped_ckpt), "inject": {"rank": 1, "steps": [3], "what": "loss"}},
        # the rerun with resume=auto continues from step-2 and matches the reference
        "resume": {"overrides": DEBUG_4 + _checkpointing(stopped_ckpt) + ["resume=auto"]},
        # NaN gradient on rank 2 at step 3 under skip: the update is dropped, training goes on
        "skip": {
            "overrides": DEBUG_4 + ["training.on_nonfinite=skip"],
            "inject": {"rank": 2, "steps": [3], "what": "grad"},
        },
        # Lightning's own SIGTERM broadcast on batches 1, 3, 5, as `python -m lightning_3d.bench.sigterm` runs it
        "odd_broadcasts": {"overrides": DEBUG_4, "odd_broadcasts": True},
        # SIGTERM on rank 1 only, at the start of step 3: every rank stops after that step
        "sigterm": {"overrides": DEBUG_4, "sigterm": {"rank": 1, "batch": 3}},
        # under pipeline parallel (the schedule runs the step), SIGTERM on the last stage's rank 3 at step 2
        "sigterm_pipeline": {
            "overrides": ["recipe=debug", "parallel.dp_shard=2", "parallel.pp=2", "trainer.max_steps=6"],
            "sigterm": {"rank": 3, "batch": 2},
        },
        # with 2 micro-batches per step, a SIGTERM on rank 0 in step 2's first one: every rank stops after step 2
        "sigterm_accumulating": {
            "overrides": DEBUG_4 + ["trainer.accumulate_grad_batches=2"],
            "sigterm": {"rank": 0, "batch": 4},
        },
        # NaN loss on rank 0 from step 2 on: 1 skip is tolerated, the second in a row stops
        "skip_limit": {
            "overrides": DEBUG_4 + ["training.on_nonfinite=skip", "training.max_skipped=1"],
            "inject": {"rank": 0, "steps": [2, 3, 4, 5], "what": "loss"},
        },
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(FORK_LAUNCH), "4", str(NONFINITE_WORKER)]
    with open(out_dir / "log.txt", "w") as log:
        code = subprocess.run([*command, str(out_dir), json.dumps(cases)], stdout=log, stderr=subprocess.STDOUT, env=env, timeout=600).returncode
    if code != 0:
        pytest.fail(f"nonfinite group failed:\n{(out_dir / 'log.txt').read_text()[-4000:]}")
    results = {name: json.loads((out_dir / f"{name}.json").read_text()) for name in cases}
    results["checkpoints"] = sorted(p.name for p in stopped_ckpt.iterdir())
    return results


def test_a_callback_sees_normalized_gradients_and_the_losses_stay_the_same(nonfinite) -> None:
    observed, reference = nonfinite["observed"], nonfinite["reference"]
    assert len(observed["seen_norms"]) == 6
    # the hook saw the gradients of the token-mean loss, whose norm the step's check agreed on
    # (unnormalized token sums would be about 8 sequences × 32 tokens times larger)
    assert observed["seen_norms"] == pytest.approx(observed["agreed_norms"], rel=1e-5)
    # normalizing before the hook or together with clipping gives the same training
    assert observed["losses"] == pytest.approx(reference["losses"], rel=LOSS_RTOL)


def test_no_broadcast_runs_during_training(nonfinite) -> None:
    # Lightning's loop broadcasts rank 0's SIGTERM flag before every batch; here the flag rides in
    # the step check's all-reduce instead
    assert nonfinite["reference"]["broadcasts"] == [0] * 4
    assert nonfinite["reference"]["global_steps"] == [6] * 4
    # the benchmark's callback still reaches Lightning's broadcast (so it measures what it names)
    odd = nonfinite["odd_broadcasts"]
    assert odd["broadcasts"] == [3] * 4 and odd["errors"] == [None] * 4
    assert odd["losses"] == pytest.approx(nonfinite["reference"]["losses"], rel=LOSS_RTOL)


@pytest.mark.parametrize(
    "case, stopped_after",
    [("sigterm", 4), ("sigterm_pipeline", 3), ("sigterm_accumulating", 3)],
    ids=["on_rank_1", "on_rank_3_under_pipeline_parallel", "on_rank_0_mid_accumulation"],
)
def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(nonfinite, case, stopped_after) -> None:
    stopped = nonfinite[case]
    assert stopped["errors"] == ["SIGTERMException"] * 4  # every rank stopped; none waits for the others
    assert stopped["global_steps"] == [stopped_after] * 4  # the step that saw the signal was completed
    assert stopped["broadcasts"] == [0] * 4
    if case == "sigterm":  # the steps before the stop are the reference's
        assert stopped["losses"] == pytest.approx(nonfinite["reference"]["losses"][:stopped_after], rel=LOSS_RTOL)


def test_nonfinite_loss_stops_every_rank_before_the_update(nonfinite) -> None:
    stop = nonfinite["stop"]
    assert all(error is not None for error in stop["errors"]), stop["errors"]
    assert len(set(stop["errors"])) == 1  # every rank raised the same verdict
    message = stop["errors"][0]
    assert message.startswith("step 3: non-finite loss on rank 1") and "no update was applied" in message
    assert stop["unchanged"] == [True] * 4  # no rank applied the step-3 update
    assert stop["global_step"] == 3
    # losses before the fault are the reference's
    assert stop["losses"][:3] == pytest.approx(nonfinite["reference"]["losses"][:3], rel=LOSS_RTOL)


def test_nonfinite_stop_loses_nothing_and_resume_auto_continues(nonfinite) -> None:
    # the stop at step 3 wrote no checkpoint; the rerun saved step-4 and step-6 after resuming from step-2
    assert nonfinite["checkpoints"] == ["step-2", "step-4", "step-6"]
    resume, reference = nonfinite["resume"], nonfinite["reference"]
    assert resume["errors"] == [None] * 4 and resume["global_step"] == 6
    assert resume["losses"] == pytest.approx(reference["losses"][2:], rel=LOSS_RTOL)


def test_nonfinite_grad_is_skipped_and_counted(nonfinite) -> None:
    skip = nonfinite["skip"]
    assert skip["errors"] == [None] * 4
    assert skip["global_step"] == 6 and skip["skipped_total"] == 1
    assert len(skip["losses"]) == 6
    # the same losses as the reference up to the skipped step; after it they differ (one update fewer)
    assert skip["losses"][:4] == pytest.approx(nonfinite["reference"]["losses"][:4], rel=LOSS_RTOL)
    assert skip["losses"][4] != pytest.approx(nonfinite["reference"]["losses"][4], rel=LOSS_RTOL)


def test_too_many_skips_in_a_row_stop(nonfinite) -> None:
    limit = nonfinite["skip_limit"]
    message = limit["errors"][0]
    assert all(error == message for error in limit["errors"])
    assert message.startswith("step 3: non-finite loss on rank 0") and "2 steps in a row, more than training.max_skipped=1" in message
    # steps 2 and 3 both left the weights as they were before step 2
    assert limit["unchanged"] == [True] * 4


def _launch_ranks(world_size: int, args: list[str], run_dir: Path) -> list[tuple[subprocess.Popen, Path]]:
    """One process per rank with its own environment, as SLURM or a multi-node script starts them."""
    port = free_port()
    ranks = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world_size),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "NODE_RANK": "0",
        }
        log = run_dir / f"rank{rank}.log"
        with open(log, "w") as handle:
            process = subprocess.Popen([sys.executable, *args], env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=run_dir)
        ranks.append((process, log))
    return ranks


def _lose_a_rank(tmp_path: Path, action: str, timeout_s: float) -> tuple[float, list[tuple[int, Path]]]:
    """Run 4 ranks; rank 2 is killed or frozen after step 3. Return the seconds from then until the
    last other rank exited, and each other rank's exit code and log."""
    stamp = tmp_path / "fault_time"
    overrides = [
        "recipe=debug", "trainer.devices=4", "parallel.dp_shard=2", "parallel.tp=2", "trainer.max_steps=1000",
        f"parallel.timeout_s={timeout_s}", f"hydra.run.dir={tmp_path / 'run'}",
    ]
    ranks = _launch_ranks(4, [str(HANG_WORKER), "2", "3", action, str(stamp), *overrides], tmp_path)
    others = [entry for rank, entry in enumerate(ranks) if rank != 2]
    deadline = time.time() + 300  # startup and the first steps, then the fault
    exits = {}
    try:
        while len(exits) < len(others) and time.time() < deadline:
            for process, _ in others:
                if process.pid not in exits and process.poll() is not None:
                    exits[process.pid] = time.time()
            time.sleep(0.1)
    finally:
        for process, _ in ranks:
            if process.poll() is None:
                process.kill()
            process.wait()
    if len(exits) < len(others):
        pytest.fail("ranks still running 300 s after launch:\n" + "\n".join(log.read_text()[-2000:] for _, log in others))
    assert stamp.exists(), ranks[2][1].read_text()[-3000:]
    fault_time = float(stamp.read_text())
    return max(exits.values()) - fault_time, [(process.returncode, log) for process, log in others]


@pytest.mark.parametrize("action, timeout_s", [("kill", 600.0), ("freeze", 10.0)])
def test_lost_rank_is_named_and_every_other_rank_exits(tmp_path, action: str, timeout_s: float) -> None:
    # kill: the peers see closed connections at once; freeze: only parallel.timeout_s (10 s here,
    # after the first step) ends their wait. Either way every other rank must exit non-zero,
    # naming rank 2, within the timeout + 30 s.
    seconds, others = _lose_a_rank(tmp_path, action, timeout_s)
    print(f"\n{action}: last other rank exited {seconds:.1f} s after rank 2 was lost")
    for code, log in others:
        text = log.read_text()
        assert code != 0, text[-3000:]
        last_lines = "\n".join(text.strip().splitlines()[-3:])
        assert "rank 2 stopped responding" in last_lines, text[-3000:]
    assert seconds < min(timeout_s, 600.0) + 30, f"{seconds:.1f} s"
